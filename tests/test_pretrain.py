"""The pretrain stage on a tiny Llama with a byte-level tokenizer (3 tokens a Chinese character, like SmolLM2's 2):
packing is exact, valid/test sentences never reach the text (and are counted), the pass-through costs nothing,
bad inputs are one clear error or a counted skip, and train starts from the pretrained model with its extended
vocabulary (adding nothing itself). The DVC run (base -> pretrain -> train -> evaluate, and an experiment on
train.* that does not re-run pretrain) is in tests/test_pipeline_e2e.py."""

from __future__ import annotations

import json
import shutil
import math
import os
import tarfile

import pytest
import torch
import yaml

from conftest import shipped
from stages import pretrain as stage
from wenyan import models as modeling, monolingual
from wenyan.errors import PipelineError
from wenyan.files import PAIR_COLUMNS
from tiny import byte_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

# the parallel data: train, valid and test sentences (valid/test must never be pretrained on)
TRAIN = [("学而时习之，不亦说乎？", "学了又时常温习，不是很愉快吗？"), ("有朋自远方来，不亦乐乎？", "有志同道合的人从远方来，不是很令人高兴的吗？")]
VALID = [("温故而知新，可以为师矣。", "温习旧的知识从而得到新的理解，就可以做老师了。")]
TEST = [("三人行，必有我师焉。", "几个人一起走，其中必定有可以做我老师的人。"), ("知之为知之，不知为不知，是知也。", "知道就是知道，不知道就是不知道，这才是聪明。")]
# monolingual chapters: classical text, with one valid and two test sentences hidden in it, HTML tags, traditional characters
MONO = {
    "孟子/梁惠王上": ["<strong>孟子见梁惠王。</strong>王曰：叟不远千里而来，亦将有以利吾国乎？",
                 "孟子对曰：王何必曰利？亦有仁义而已矣。三人行，必有我师焉。<br/>王曰：何以利吾国？"],
    "孟子/公孙丑上": ["公孫丑問曰：夫子當路於齊，管仲、晏子之功，可復許乎？", "温故而知新，可以为师矣。"],
    "荀子/劝学": ["君子曰：学不可以已。青，取之于蓝，而青于蓝；冰，水为之，而寒于水。",
               "知道就是知道，不知道就是不知道，这才是聪明。", "故木受绳则直，金就砺则利，君子博学而日参省乎己，则知明而行无过矣。"],
}
SYSTEM = "你是翻译家。"
PROMPT = {"format": {"system_prompt": SYSTEM, "user_template": "翻译：\n{classical}", "context_sentences": 0,
                     "context_template": "上文：{context}\n"}, "clean": {"opencc": "t2s"}}
HELD_OUT_IN_MONO = 3  # 三人行… (test source), 温故而知新… (valid source), 知道就是知道… (test target)


def write_split(split_dir):
    import pandas as pd

    split_dir.mkdir(parents=True)
    for name, pairs in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        rows = [{"id": f"c/论语/{name}#{i}", "corpus": "c", "book": "论语", "chapter": name, "line": i + 1,
                 "source": s, "target": t} for i, (s, t) in enumerate(pairs)]
        pd.DataFrame(rows, columns=list(PAIR_COLUMNS)).to_parquet(split_dir / f"{name}.parquet", index=False)


def write_mono(root, chapters=MONO, top="classical-mono"):
    for key, lines in chapters.items():
        d = root / top / "古文原文" / key
        d.mkdir(parents=True, exist_ok=True)
        (d / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    first_book = root / top / "古文原文" / next(iter(chapters)).split("/")[0]
    (first_book / "数据来源.txt").write_text("某网站\n", encoding="utf-8")  # not a chapter: ignored
    return root / top


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """models/base (base.json -> a tiny model dir), data/split, a monolingual corpus directory."""
    root = tmp_path_factory.mktemp("pretrain")
    tok = byte_tokenizer()
    model_dir = root / "tiny-llama"
    tiny_llama(tok, max_position_embeddings=512).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    base = root / "models/base"
    base.mkdir(parents=True)
    (base / "base.json").write_text(json.dumps({"model": str(model_dir), "location": str(model_dir)}), encoding="utf-8")
    write_split(root / "split")
    return {"root": root, "model": str(model_dir), "base": base, "split": root / "split",
            "mono": write_mono(root / "corpus")}


def params(source, **overrides) -> dict:
    tiny = dict(enabled=True, sources=[{"path": str(source), "format": "niutrans"}], max_seq_length=32, batch_tokens=64,
                gradient_accumulation_steps=1, max_steps=3, warmup_steps=0, learning_rate=0.005, logging_steps=1,
                backend="hf", extend_vocab="auto")
    return {"pretrain": shipped("pretrain", **{**tiny, **overrides}), "clean": {"opencc": "t2s"}}


def run(project, tmp_path, name="run", **overrides):
    source = overrides.pop("source", project["mono"])
    check = ["--check-params"] if overrides.pop("check_params", False) else []
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params(source, **overrides), allow_unicode=True), encoding="utf-8")
    stage.main(["--base", str(project["base"]), "--split-dir", str(project["split"]), "--out", str(out / "pretrain"),
                "--reports", str(out / "reports"), "--params", str(out / "params.yaml"), *check])
    return out / "pretrain", out / "reports"


# ----------------------------------------------------------------------------------------------


def test_packing_is_exact():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    rows, total, tail = monolingual.pack(docs, eos_id=0, length=4)
    assert total == 12 and tail == 0 and rows.shape == (3, 4)
    assert rows.reshape(-1).tolist() == [5, 6, 7, 0, 8, 0, 9, 10, 11, 12, 13, 0]  # every document ends with EOS
    rows, total, tail = monolingual.pack(docs, eos_id=0, length=5)
    assert rows.shape == (2, 5) and tail == 2 and rows.reshape(-1).tolist() == [5, 6, 7, 0, 8, 0, 9, 10, 11, 12]
    assert monolingual.pack([[1]], eos_id=0, length=3)[0].shape == (0, 3)  # too short for one row: no padding, no row


def test_overlap_removal_cuts_the_held_out_sentences_and_counts_them():
    import collections

    import pandas as pd

    keys = monolingual.held_out_keys([pd.DataFrame({"source": ["三人行，必有我师焉。"], "target": ["几个人一起走。"]})])
    counts = collections.Counter()
    docs = [("a", ["子曰：三人行，必有我师焉。择其善者而从之。", "三人行必有我师焉", "几个人一起走！"]), ("b", ["几个人 一起走。"])]
    out = monolingual.remove_overlap(docs, keys, counts)
    assert out == [("a", ["子曰：三人行，必有我师焉。择其善者而从之。"])]  # a longer sentence is not the test sentence
    assert counts["sentences_removed"] == 3 and counts["lines_removed"] == 3 and counts["documents_removed"] == 1
    assert monolingual.sentences("甲。乙？“丙！”丁") == ["甲。", "乙？", "“丙！”", "丁"]


def test_overlap_removal_counts_compatibility_forms_as_their_characters():
    """Issue 29, class 5, in pretrain's valid/test removal too (one leakage key, wenyan.text): a held-out sentence
    spelt with a Kangxi radical, full-width digits or a compatibility ideograph is still the held-out sentence."""
    import collections

    import pandas as pd

    keys = monolingual.held_out_keys([pd.DataFrame({"source": ["人之初，性本善。", "第１２卷"], "target": ["豈有此理。", "x"]})])
    docs = [("a", ["⼈之初，性本善。", "第12卷。", "\uf900有此理。", "苟不教，性乃迁。"])]  # ⼈ U+2F08, 豈 U+F900
    out = monolingual.remove_overlap(docs, keys, collections.Counter())
    assert out == [("a", ["苟不教，性乃迁。"])]


def test_pretrain_then_train_starts_from_it_with_its_vocabulary(project, tmp_path):
    model_dir, reports = run(project, tmp_path, include_train_split=True, extend_vocab=1)
    info = json.loads((model_dir / "pretrain.json").read_text())
    data = json.loads((reports / "data.json").read_text())
    metrics = json.loads((reports / "metrics.json").read_text())
    summary = json.loads((reports / "summary.json").read_text())
    # the text: 3 chapters read, the 数据来源.txt beside them ignored, the held-out sentences removed and counted
    assert data["sources"][0]["files_read"] == 3 and data["sources"][0]["files_ignored"] == 1
    assert data["sources"][0]["html_tags_removed"] == 3
    assert data["removed_for_overlap"]["sources"]["sentences_removed"] == HELD_OUT_IN_MONO
    assert data["removed_for_overlap"]["train_split"].get("sentences_removed", 0) == 0
    assert data["train_split_documents"] == 2  # the train chapter's sources and targets
    # packed exactly: the sequences, the dropped tail and the EOS after each document add up
    assert data["sequences"] * 32 + data["tail_tokens_dropped"] == data["tokens"]
    assert data["eos_token"] == "<|im_end|>"
    assert metrics["steps"] == 3 and metrics["tokens"] == 3 * 64 and math.isfinite(metrics["loss"])
    assert summary["trainable_params"] == summary["total_params"]  # all weights
    assert (reports / "plots/metrics/train/loss.tsv").is_file()
    # the vocabulary was extended here, from the pretraining text + train split, never a valid/test-only character
    assert info["extend_vocab"]["added"] > 0 and info["passthrough"] is False
    tok = modeling.load_tokenizer(str(model_dir))
    assert len(tok) == info["vocab_size"] > len(byte_tokenizer())
    assert "梁" in tok.get_vocab() and "惠" in tok.get_vocab()
    added = {t["content"] for t in json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]}
    held_out_only = set("".join(s + t for s, t in VALID + TEST)) - set("".join(sum(MONO.values(), [])) + "".join(s + t for s, t in TRAIN))
    assert held_out_only and not (held_out_only & added)

    # train takes it as its base; its own extend_vocab auto finds ~1 token a character and adds nothing
    from stages import train as train_stage

    train_dir = tmp_path / "train"
    data_dir = train_dir / "format"
    data_dir.mkdir(parents=True)
    rows = [{"id": f"r{i}", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "翻译：\n" + s},
                                         {"role": "assistant", "content": t}]} for i, (s, t) in enumerate(TRAIN * 4)]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    train_params = shipped("train", model=project["model"], backend="hf", max_seq_length=128, batch_tokens=0, batch_size=4,
                           max_steps=2, warmup_steps=0, logging_steps=1, eval_samples=0, save_steps=0, extend_vocab="auto")
    (train_dir / "params.yaml").write_text(yaml.safe_dump({"train": train_params, **PROMPT}, allow_unicode=True), encoding="utf-8")
    train_stage.main(["--train", str(data_dir / "train.jsonl"), "--base", str(model_dir), "--out", str(train_dir / "adapter"),
                      "--checkpoints", str(train_dir / "ck"), "--reports", str(train_dir / "reports"),
                      "--params", str(train_dir / "params.yaml")])
    config = json.loads((train_dir / "adapter/training_config.json").read_text())
    assert config["model"] == str(model_dir) and config["pretrained"]["base_model"] == project["model"]
    assert config["extend_vocab"]["added"] == 0 and config["extend_vocab"]["tokens_per_cjk_char_before"] < 1.3
    trained = modeling.load_trained(train_dir / "adapter")  # what evaluate loads: the pretrained base + the adapter
    assert trained.model.get_input_embeddings().num_embeddings == info["vocab_size"]


def test_passthrough_writes_a_marker_and_train_keeps_its_base(project, tmp_path):
    for overrides in ({"enabled": False}, {"max_steps": 0, "epochs": 0}):
        model_dir, reports = run(project, tmp_path, str(len(overrides)), source="/nonexistent", **overrides)
        assert sorted(p.name for p in model_dir.iterdir()) == [".wenyan-outputs.json", "pretrain.json"]  # no model copy (+ the manifest)
        assert json.loads((reports / "metrics.json").read_text())["tokens"] == 0
        # an empty curve, never an empty directory: git keeps no empty directory, so a clone would lack the output
        assert (reports / "plots/metrics/train/loss.tsv").read_text() == "step\tloss\n"
        assert modeling.resolve_pretrained(model_dir, "smollm2-135m-instruct") == (
            "smollm2-135m-instruct", json.loads((model_dir / "pretrain.json").read_text()))


@pytest.mark.bad_input
@pytest.mark.parametrize("where", ["pretrain", "reports"])
def test_an_output_holding_files_pretrain_did_not_write_is_refused_and_kept(project, tmp_path, where):
    kept = tmp_path / "mine" / where / "notes.txt"
    kept.parent.mkdir(parents=True)
    kept.write_text("my notes")
    with pytest.raises(PipelineError, match=r"did not write \(notes.txt\)"):
        run(project, tmp_path, "mine", enabled=False)
    assert kept.read_text() == "my notes"


@pytest.mark.bad_input
def test_pretrained_from_another_model_is_refused(project, tmp_path):
    model_dir = tmp_path / "p"
    model_dir.mkdir()
    (model_dir / "pretrain.json").write_text(json.dumps({"passthrough": False, "base_model": "other"}))
    with pytest.raises(PipelineError, match="was pretrained from 'other', but train.model is 'mine'"):
        modeling.resolve_pretrained(model_dir, "mine")
    with pytest.raises(PipelineError, match="pretrain.json: not found; run the pretrain stage"):
        modeling.resolve_pretrained(tmp_path, "mine")


@pytest.mark.bad_input
def test_no_text_at_all_is_one_clear_error(project, tmp_path):
    empty = write_mono(tmp_path / "empty", {"孟子/一": [""], "孟子/二": ["   "]})
    with pytest.raises(PipelineError, match="pretrain read no text at all from pretrain.sources"):
        run(project, tmp_path, source=empty)
    nothing = tmp_path / "nothing"
    (nothing / "x").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"no text.txt found; expected the NiuTrans monolingual layout"):
        run(project, tmp_path, source=nothing)


@pytest.mark.bad_input
def test_text_only_in_test_is_all_removed_and_an_error(project, tmp_path):
    only_test = write_mono(tmp_path / "t", {"论语/述而": [s for s, _ in TEST] + [t for _, t in TEST]})
    with pytest.raises(PipelineError, match=r"every sentence of pretrain.sources \(4\) appears in the valid or test split"):
        run(project, tmp_path, source=only_test)


@pytest.mark.bad_input
def test_unreadable_files_are_counted_and_bad_text_is_one_error(project, tmp_path, capsys):
    corpus = write_mono(tmp_path / "c", {"荀子/劝学": MONO["荀子/劝学"]})
    book = corpus / "古文原文" / "坏书"
    book.mkdir()
    os.symlink("/etc/passwd", book / "text.txt")  # a link outside the corpus: never opened, counted
    os.mkfifo(corpus / "古文原文" / "荀子" / "fifo")  # not a regular file: never opened, counted
    _, reports = run(project, tmp_path, "skips", source=corpus)
    skipped = json.loads((reports / "data.json").read_text())["sources"][0]
    assert skipped["skipped_by_reason"] == {"link outside the corpus": 1, "not a regular file": 1}
    assert skipped["files_read"] == 1

    (corpus / "古文原文" / "荀子" / "劝学" / "text.txt").write_bytes("君子曰：学不可以已。\n".encode("gbk"))
    with pytest.raises(PipelineError, match=r"劝学/text.txt:1: not valid utf-8"):
        run(project, tmp_path, "bad", source=corpus)
    # from the command line: one `error:` line, no traceback
    import subprocess
    import sys

    out = tmp_path / "bad"
    proc = subprocess.run([sys.executable, "-m", "stages.pretrain", "--base", str(project["base"]), "--split-dir",
                           str(project["split"]), "--out", str(out / "m"), "--reports", str(out / "r"), "--params",
                           str(out / "params.yaml")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "劝学/text.txt:1: not valid utf-8" in errors[0] and "pretrain.sources" in errors[0]


def test_archives_text_and_jsonl_sources(project, tmp_path):
    """The same chapters from a .tar.xz as from the directory, plus a plain text file and a JSONL file."""
    archive = tmp_path / "mono.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(project["mono"], arcname="classical-mono")
    plain = tmp_path / "plain.txt"
    plain.write_text("天下之本在国。\n国之本在家。\n\n家之本在身。\n", encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "<br/>人之初，性本善。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    _, reports = run(project, tmp_path, "formats", max_steps=1, extend_vocab="none", sources=[
        {"path": str(archive), "format": "niutrans"}, {"path": str(plain), "format": "text"},
        {"path": str(jsonl), "format": "jsonl"}])
    data = json.loads((reports / "data.json").read_text())
    assert [s["documents"] for s in data["sources"]] == [3, 2, 1]
    assert data["removed_for_overlap"]["sources"]["sentences_removed"] == HELD_OUT_IN_MONO


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", [
    ({"batch_tokens": 48}, r"pretrain.batch_tokens 48 must be a multiple of pretrain.max_seq_length x"),
    ({"sources": {"0": {"path": "."}}}, r"'pretrain.sources.0': sources are keyed by name"),
    ({"sources": {"mine": "x"}}, r"'pretrain.sources.mine' should be a mapping of path, format"),
    ({"sources": {"mine": {"path": "/nonexistent.tar.xz"}}}, r"/nonexistent.tar.xz: not found \(params.yaml pretrain.sources.mine.path\)"),
    ({"sources": []}, r"'pretrain.sources' is empty"),
    ({"sources": [{"path": "/nonexistent.tar.xz"}]}, r"/nonexistent.tar.xz: not found \(params.yaml pretrain.sources\[0\].path\)"),
    ({"sources": [{"path": ".", "format": "epub"}]}, r"pretrain.sources\[0\].format' should be one of niutrans, text, jsonl"),
    ({"extend_vocab": "many"}, "extend_vocab must be auto, none or a minimum count"),
    ({"max_tokens": 8}, "pretrain.max_tokens 8 is less than one sequence"),
])
def test_bad_params_are_one_clear_error(project, tmp_path, overrides, message):
    with pytest.raises(PipelineError, match=message):
        run(project, tmp_path, **overrides)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + unsloth")
def test_unsloth_backend_pretrains(project, tmp_path):
    """The GPU path: unsloth's FastLanguageModel with full_finetuning (train's loader), in a fresh interpreter
    (unsloth must be imported before transformers)."""
    import subprocess
    import sys

    out = tmp_path / "gpu"
    out.mkdir()
    (out / "params.yaml").write_text(yaml.safe_dump(params(project["mono"], backend="unsloth", dtype="bf16", extend_vocab=1),
                                                    allow_unicode=True), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "stages.pretrain", "--base", str(project["base"]), "--split-dir",
                           str(project["split"]), "--out", str(out / "m"), "--reports", str(out / "r"), "--params",
                           str(out / "params.yaml")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "r/summary.json").read_text())
    assert summary["backend"] == "unsloth" and summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    assert summary["trainable_params"] == summary["total_params"] and summary["added_tokens"] > 0
    assert modeling.resolve_pretrained(out / "m", project["model"])[0] == str(out / "m")


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", [
    ({"batch_tokens": 48}, r"pretrain.batch_tokens 48 must be a multiple of pretrain.max_seq_length x"),
    ({"sources": [{"path": "/nonexistent.tar.xz"}]}, r"/nonexistent.tar.xz: not found \(params.yaml pretrain.sources\[0\].path\)"),
    ({"optim": "adamw_nonesuch"}, r"pretrain.optim"),
])
def test_check_params_fails_like_the_run_and_writes_nothing(project, tmp_path, overrides, message):
    """--check-params (the check_params stage): the run's parameter checks, then exit before reading any input."""
    with pytest.raises(PipelineError, match=message):
        run(project, tmp_path, check_params=True, **overrides)
    assert not (tmp_path / "run" / "pretrain").exists() and not (tmp_path / "run" / "reports").exists()
    out, reports = run(project, tmp_path, "good", check_params=True)
    assert not out.exists() and not reports.exists()
    # a pass-through reads no source: its sources are not checked
    run(project, tmp_path, "off", check_params=True, enabled=False, sources=[{"path": "/nonexistent.tar.xz"}])


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["--out is --base", "--reports inside --split-dir", "--out is --reports",
                                  "a source inside --out", "--out inside a source (via ..)"])
def test_an_output_onto_an_input_or_the_other_output_is_refused_first(project, tmp_path, case):
    """Issue 21 class 1 in pretrain: no output may be, contain or sit inside an input (base, split, a source of
    the text) or the other output, whatever its spelling; refused before anything is read, nothing changes."""
    mono = tmp_path / "mono"
    shutil.copytree(project["mono"], mono)
    out, reports, source = tmp_path / "p", tmp_path / "r", mono
    if case == "--out is --base":
        out = project["base"]
    elif case == "--reports inside --split-dir":
        reports = project["split"] / "reports"
    elif case == "--out is --reports":
        reports = out
    elif case == "a source inside --out":
        out = tmp_path
    else:
        out = mono / "sub" / ".." / "inner"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params(source), allow_unicode=True), encoding="utf-8")
    before = {p: p.read_bytes() for root in (project["base"], project["split"], mono) for p in root.rglob("*") if p.is_file()}
    with pytest.raises(PipelineError, match=r"the output --(out|reports) (is|lies inside|contains) the (input|output) "):
        stage.main(["--base", str(project["base"]), "--split-dir", str(project["split"]), "--out", str(out),
                    "--reports", str(reports), "--params", str(tmp_path / "params.yaml")])
    assert {p: p.read_bytes() for p in before} == before
    assert not (project["split"] / "reports").exists()


# ----------------------------------------------------------------------------------------------
# Archives by ingest's rules (issue 29, class 4): the same reader (wenyan.archives.iter_files), so the same limits;
# tests/test_archives.py runs each bomb through both readers


@pytest.mark.bad_input
def test_a_link_bomb_is_one_error_not_gigabytes(project, tmp_path):
    """~10 kB of .tar.xz: one 3 MB chapter and 3,000 hard links to it (9 GB of text in memory once decoded)."""
    import io

    chapter = ("学而时习之，不亦说乎。" * 3000 + "\n").encode("utf-8") * 30
    bomb = tmp_path / "bomb.tar.xz"
    with tarfile.open(bomb, "w:xz") as tar:
        info = tarfile.TarInfo("mono/古文原文/论语/学而/text.txt")
        info.size = len(chapter)
        tar.addfile(info, io.BytesIO(chapter))
        for i in range(3000):
            link = tarfile.TarInfo(f"mono/古文原文/论语/第{i}/text.txt")
            link.type, link.linkname = tarfile.LNKTYPE, "mono/古文原文/论语/学而/text.txt"
            tar.addfile(link)
    assert bomb.stat().st_size < 20_000
    with pytest.raises(PipelineError, match=rf"^{bomb}: expands to more than 134,217,728 bytes as it is read"):
        run(project, tmp_path, "bomb", source=bomb)


@pytest.mark.bad_input
def test_a_chapter_given_twice_in_an_archive_is_read_once_the_later_as_ingest_does(project, tmp_path):
    from wenyan import archives

    archive = tmp_path / "twice.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(project["mono"], arcname="classical-mono")
    newer = "孟子见梁惠王。王曰：叟不远千里而来。\n".encode("utf-8")
    with tarfile.open(archive, "a") as tar:  # appended, as `tar rf` does
        import io

        info = tarfile.TarInfo("classical-mono/古文原文/孟子/梁惠王上/text.txt")
        info.size = len(newer)
        tar.addfile(info, io.BytesIO(newer))
    stats = monolingual.Stats()
    docs = monolingual.read_source({"path": str(archive), "format": "niutrans", "books": [], "encoding": "utf-8",
                                    "field": "text"}, stats)
    assert dict(docs)["孟子/梁惠王上"] == [newer.decode().strip()] and len(docs) == 3
    assert stats.report()["not_used_by_reason"] == {archives.REPLACED: 1}
    assert stats.files_read == 4  # both copies were read; the earlier is counted, not used
