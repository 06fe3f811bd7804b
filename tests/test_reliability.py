"""Reliability gaps not covered by the per-stage tests: a 100,000-character line, a corpus that cleaning
empties, GBK in the NiuTrans layout, a failed run keeping the last good output and report (also when it
fails between writing the data and the report: wenyan.files.atomic_outputs), and `python -m stages.<x>` printing
one `error:` line (no traceback) for bad params (more stages: test_cli_errors.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BASE_PARAMS, CHAPTERS, N_PAIRS, REPO, niutrans, pairs_frame, shipped

from stages import clean, ingest, split
from stages import format as format_stage
from wenyan.errors import PipelineError
from wenyan.files import atomic_outputs


def run_ingest(tmp_path, write_params, sources):
    params = write_params(ingest={"sources": sources})
    out, report = tmp_path / "ingest" / "pairs.parquet", tmp_path / "ingest" / "ingest.json"
    ingest.main(["--out", str(out), "--report", str(report), "--params", str(params)])
    return out, json.loads(report.read_text(encoding="utf-8"))


def clean_argv(pairs, out_dir, params):
    return ["--pairs", str(pairs), "--out", str(out_dir / "pairs.parquet"), "--report", str(out_dir / "clean.json"),
            "--params", str(params)]


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob(".*.tmp")]


# ----------------------------------------------------------------------------------------------
# Bad corpora


@pytest.mark.bad_input
def test_100k_character_line_is_ingested_then_dropped_by_clean_as_too_long(tmp_path, make_corpus, write_params):
    chapters = dict(CHAPTERS)
    src, tgt = chapters["论语/学而篇"]
    chapters["论语/学而篇"] = (src[:1] + ["学" * 100_000] + src[2:], tgt)
    root = make_corpus(chapters=chapters)
    pairs, report = run_ingest(tmp_path, write_params, [niutrans(root)])
    df = pd.read_parquet(pairs)
    assert len(df) == N_PAIRS and report["pairs"] == N_PAIRS
    assert df["source"].str.len().max() == 100_000

    out = tmp_path / "clean"
    clean.main(clean_argv(pairs, out, write_params()))
    cleaned = pd.read_parquet(out / "pairs.parquet")
    clean_report = json.loads((out / "clean.json").read_text(encoding="utf-8"))
    assert clean_report["dropped"]["too_long"] == 1 and clean_report["pairs_kept"] == N_PAIRS - 1
    assert clean_report["dropped_per_book"]["corp/论语"] == {"too_long": 1}
    assert cleaned["source"].str.len().max() <= 200


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "rows, clean_params",
    [
        ([("善", "好"), ("曰", "说")], {}),  # every pair too short
        ([("学而时习之", "学了又时常温习")], {"max_chars": 3, "min_chars": 1}),  # every pair too long
    ],
)
def test_corpus_emptied_by_clean_is_a_clear_error_and_writes_nothing(tmp_path, write_params, rows, clean_params):
    pairs = tmp_path / "pairs.parquet"
    pairs_frame(rows).to_parquet(pairs, index=False)
    out = tmp_path / "clean"
    with pytest.raises(PipelineError) as err:
        clean.main(clean_argv(pairs, out, write_params(clean=clean_params)))
    message = str(err.value)
    assert f"kept no pairs out of {len(rows)}" in message and "clean.min_chars/max_chars/max_ratio" in message
    assert not (out / "pairs.parquet").exists() and not (out / "clean.json").exists()
    assert not out.exists() or no_temp_files(out)


@pytest.mark.bad_input
def test_empty_clean_output_given_to_split_is_a_clear_error(tmp_path, write_params):
    pairs = tmp_path / "pairs.parquet"
    pairs_frame([("甲乙", "丙丁")]).iloc[:0].to_parquet(pairs, index=False)  # same schema, no rows
    out = tmp_path / "split"
    with pytest.raises(PipelineError, match="train split is empty.*clean.min_chars"):
        split.main(["--pairs", str(pairs), "--out", str(out), "--report", str(tmp_path / "split.json"),
                    "--params", str(write_params())])
    assert not list(out.glob("*.parquet")) and not (tmp_path / "split.json").exists()


@pytest.mark.bad_input
def test_gbk_niutrans_corpus_needs_the_encoding_option(tmp_path, make_corpus, write_params):
    root = make_corpus()
    for f in root.rglob("*.txt"):
        f.write_bytes(f.read_text(encoding="utf-8").encode("gbk"))
    with pytest.raises(PipelineError, match=r"source\.txt:1: .*not valid utf-8.*encoding"):
        run_ingest(tmp_path, write_params, [niutrans(root)])
    pairs, report = run_ingest(tmp_path, write_params, [niutrans(root, encoding="gbk")])
    df = pd.read_parquet(pairs)
    assert len(df) == N_PAIRS and "子曰：学而时习之，不亦说乎？" in df["source"].tolist()


# ----------------------------------------------------------------------------------------------
# A failed run keeps the last good output and report


@pytest.fixture
def good_clean(tmp_path, write_params):
    rows = [("学而时习之，不亦说乎？", "学了又时常温习，不是很愉快吗？"), ("有朋自远方来，不亦乐乎？", "有志同道合的人从远方来。")]
    pairs = tmp_path / "pairs.parquet"
    pairs_frame(rows).to_parquet(pairs, index=False)
    out = tmp_path / "clean"
    clean.main(clean_argv(pairs, out, write_params()))
    before = snapshot(out)
    assert set(before) == {"pairs.parquet", "clean.json"}
    return pairs, out, before


@pytest.mark.bad_input
def test_clean_failing_on_its_data_keeps_the_last_good_output(good_clean, write_params, tmp_path):
    pairs, out, before = good_clean
    with pytest.raises(PipelineError, match="kept no pairs"):
        clean.main(clean_argv(pairs, out, write_params(clean={"min_chars": 1, "max_chars": 3})))
    assert snapshot(out) == before and no_temp_files(out)


def test_clean_killed_mid_write_keeps_the_last_good_output(good_clean, write_params, monkeypatch):
    pairs, out, before = good_clean
    real_to_parquet = pd.DataFrame.to_parquet

    def half_then_die(self, path, *args, **kwargs):
        real_to_parquet(self, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed half-way")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        clean.main(clean_argv(pairs, out, write_params(clean={"dedupe": False})))
    assert snapshot(out) == before and no_temp_files(out)


def test_clean_report_write_failing_leaves_no_partial_report(good_clean, write_params, monkeypatch):
    pairs, out, before = good_clean
    real_write_text = Path.write_text

    def die_in_the_middle(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", die_in_the_middle)
    with pytest.raises(OSError, match="disk full"):
        clean.main(clean_argv(pairs, out, write_params(clean={"dedupe": False})))
    monkeypatch.undo()
    assert (out / "clean.json").read_bytes() == before["clean.json"]  # the old report, whole
    json.loads((out / "clean.json").read_text(encoding="utf-8"))
    assert no_temp_files(out)


@pytest.mark.bad_input
def test_split_failing_keeps_the_last_good_splits_and_report(tmp_path, write_params):
    pairs = tmp_path / "pairs.parquet"
    rows = [(f"第{i}句之文也。", f"第{i}句的译文。") for i in range(12)]
    frame = pd.concat([pairs_frame(rows, "甲"), pairs_frame(rows, "乙")], ignore_index=True)
    frame.to_parquet(pairs, index=False)
    out, report = tmp_path / "split", tmp_path / "split.json"
    argv = ["--pairs", str(pairs), "--out", str(out), "--report", str(report)]
    split.main(argv + ["--params", str(write_params(split={"valid_fraction": 0.1, "test_fraction": 0.1}))])
    before, report_before = snapshot(out), report.read_bytes()
    assert set(before) == {"train.parquet", "valid.parquet", "test.parquet"}
    # every book held out as test: the train split would be empty
    with pytest.raises(PipelineError, match="train split is empty"):
        split.main(argv + ["--params", str(write_params(split={"test_books": ["甲", "乙"]}))])
    assert snapshot(out) == before and report.read_bytes() == report_before and no_temp_files(tmp_path)


def test_atomic_outputs_renames_all_or_none(tmp_path):
    data, report = tmp_path / "d" / "pairs.parquet", tmp_path / "r" / "report.json"
    with atomic_outputs(data, report) as (d, r):
        d.write_bytes(b"old data")
        r.write_bytes(b"old report")
    with pytest.raises(RuntimeError):
        with atomic_outputs(data, report) as (d, r):
            d.write_bytes(b"new data")
            raise RuntimeError("died before the report")
    assert data.read_bytes() == b"old data" and report.read_bytes() == b"old report" and no_temp_files(tmp_path)
    with atomic_outputs(data, report) as (d, r):
        d.write_bytes(b"new data")
        r.write_bytes(b"new report")
    assert data.read_bytes() == b"new data" and report.read_bytes() == b"new report" and no_temp_files(tmp_path)


def data_stage_runs(tmp_path, make_corpus, write_params):
    """{stage: (module, argv(params) -> list, good params, other params)}: each stage's inputs made by the stages
    before it; every output (data and report) of a stage lands under tmp_path/<stage>."""
    ing, cln, spl = tmp_path / "ingest", tmp_path / "clean", tmp_path / "split"
    ingest_params = write_params(tmp_path / "ingest.yaml", ingest={"sources": [niutrans(make_corpus())]})
    ingest.main(["--out", str(ing / "pairs.parquet"), "--report", str(ing / "ingest.json"), "--params", str(ingest_params)])
    clean.main(clean_argv(ing / "pairs.parquet", cln, write_params()))
    split_params = write_params(tmp_path / "split.yaml", split={"test_books": ["史记"]})  # a test split: split needs one
    split.main(["--pairs", str(cln / "pairs.parquet"), "--out", str(spl / "data"), "--report", str(spl / "split.json"),
                "--params", str(split_params)])
    return {
        "ingest": (ingest, lambda p: ["--out", str(ing / "pairs.parquet"), "--report", str(ing / "ingest.json"), "--params", str(p)],
                   ingest_params, write_params(tmp_path / "other-ingest.yaml", ingest={"sources": [niutrans(make_corpus(), books=["论语"])]})),
        "clean": (clean, lambda p: clean_argv(ing / "pairs.parquet", cln, p),
                  write_params(), write_params(tmp_path / "other-clean.yaml", clean={"opencc": "none"})),
        "split": (split, lambda p: ["--pairs", str(cln / "pairs.parquet"), "--out", str(spl / "data"), "--report",
                                    str(spl / "split.json"), "--params", str(p)],
                  split_params, write_params(tmp_path / "other-split.yaml", split={"test_books": ["论语"]})),
        "format": (format_stage, lambda p: ["--split-dir", str(spl / "data"), "--out", str(tmp_path / "format" / "data"),
                                            "--report", str(tmp_path / "format" / "format.json"), "--params", str(p)],
                   write_params(), write_params(tmp_path / "other-format.yaml", format={"system_prompt": "另一个提示。"})),
    }


@pytest.mark.parametrize("stage", ["ingest", "clean", "split", "format"])
def test_failure_between_data_and_report_keeps_both_last_good_outputs(stage, tmp_path, make_corpus, write_params, monkeypatch):
    """The data file(s) and the report of a stage change together or not at all (wenyan.files.atomic_outputs)."""
    module, argv, good, other = data_stage_runs(tmp_path, make_corpus, write_params)[stage]
    module.main(argv(good))
    out = tmp_path / stage
    before = snapshot(out)
    assert len(before) >= 2  # data and report

    def die(path, obj):  # the data is written by now; the report never is
        assert any(p.name.endswith(".tmp") for p in out.rglob("*")), "data should sit in a temporary file by now"
        raise OSError("disk full")

    monkeypatch.setattr(module, "write_json", die)
    with pytest.raises(OSError, match="disk full"):
        module.main(argv(other))
    assert snapshot(out) == before and no_temp_files(out)

    monkeypatch.undo()  # the same run without the failure does change both: the check above was not vacuous
    module.main(argv(other))
    after = snapshot(out)
    assert set(after) == set(before) and all(after[k] != before[k] for k in before if k.endswith(".json"))
    assert any(after[k] != before[k] for k in before if not k.endswith(".json"))


# ----------------------------------------------------------------------------------------------
# `python -m stages.<x>` with bad params: one `error:` line, exit 1, no traceback, nothing written


def run_cli(stage, args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=REPO, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


@pytest.mark.bad_input
def test_cli_ingest_misspelled_key(tmp_path, write_params):
    params = write_params(ingest={"sorces": []})
    error = run_cli("ingest", ["--out", str(tmp_path / "p.parquet"), "--report", str(tmp_path / "r.json"), "--params", str(params)], tmp_path)
    assert "'sorces' (did you mean 'sources'?)" in error
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.bad_input
def test_cli_clean_unknown_opencc_config(tmp_path, write_params):
    params = write_params(clean={"opencc": "t2x"})
    error = run_cli("clean", ["--pairs", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o.parquet"),
                              "--report", str(tmp_path / "r.json"), "--params", str(params)], tmp_path)
    assert "unknown OpenCC config 't2x'" in error and "t2s" in error  # checked before reading the input


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"chat_template": "vicuna"}, "chat_template 'vicuna' is unknown"),
        ({"model": "/nonexistent/model-dir"}, "neither an existing path nor a hub id"),
    ],
)
def test_cli_train_bad_params_fail_before_loading(tmp_path, overrides, message):
    model_dir = tmp_path / "empty-model"  # exists but holds no model: loading it would fail differently
    model_dir.mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": shipped("train", **{"model": str(model_dir), "backend": "hf", **overrides}),
                                     "format": BASE_PARAMS["format"], "clean": BASE_PARAMS["clean"]}, allow_unicode=True), encoding="utf-8")
    train = tmp_path / "train.jsonl"  # absent: reading the data would fail differently too
    error = run_cli("train", ["--train", str(train), "--out", str(tmp_path / "adapter"), "--checkpoints",
                              str(tmp_path / "ckpt"), "--reports", str(tmp_path / "reports"), "--params", str(params)], tmp_path)
    assert message in error
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "reports").exists()
