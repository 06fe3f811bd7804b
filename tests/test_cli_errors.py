"""`python -m stages.<x>` with a bad input or a bad parameter, for format, evaluate, export and translate:
exit status 1, stderr ends with one `error:` line naming the file (and line, where there is one) and what
to do, no traceback, and nothing written. (ingest, clean and train: tests/test_reliability.py.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import jsonl_row, params_file, run_cli

pytestmark = pytest.mark.bad_input


# ----------------------------------------------------------------------------------------------
# format


@pytest.mark.parametrize("case", ["missing split", "corrupt parquet", "missing columns", "template without {classical}"])
def test_cli_format_bad_input(tmp_path, case):
    split, out, report = tmp_path / "split", tmp_path / "format", tmp_path / "format.json"
    split.mkdir()
    params = params_file(tmp_path)
    if case == "missing split":
        expected = [str(split / "train.parquet"), "not found", "dvc repro split"]
    elif case == "corrupt parquet":
        (split / "train.parquet").write_bytes(b"PAR1 half a file")
        expected = [str(split / "train.parquet"), "not a readable parquet file", "dvc repro split"]
    elif case == "missing columns":
        pd.DataFrame({"id": ["a"], "source": ["甲"]}).to_parquet(split / "train.parquet")
        expected = [str(split / "train.parquet"), "missing column(s) corpus, book, chapter, line, target"]
    else:
        params = params_file(tmp_path, format={"user_template": "翻译："})
        expected = ["params.yaml 'format.user_template'", "{classical}"]
    error = run_cli("format", "--split-dir", split, "--out", out, "--report", report, "--params", params)
    assert all(e in error for e in expected), error
    assert not out.exists() and not report.exists()


# ----------------------------------------------------------------------------------------------
# evaluate: every bad input below fails before any model is loaded


@pytest.mark.parametrize("case", ["missing test file", "malformed JSONL line", "JSONL line not an object",
                                  "non-UTF-8 line", "misspelled param", "missing model"])
def test_cli_evaluate_bad_input(tmp_path, case):
    test = tmp_path / "test.jsonl"
    lines = [json.dumps(jsonl_row(1), ensure_ascii=False), json.dumps(jsonl_row(2), ensure_ascii=False)]
    params = params_file(tmp_path)
    if case == "missing test file":
        expected = [f"{test}: file not found", "dvc repro"]
    elif case == "malformed JSONL line":
        test.write_text(f"{lines[0]}\n{lines[1][:-5]}\n", encoding="utf-8")
        expected = [f"{test}:2: not valid JSON", "fix or delete that line"]
    elif case == "JSONL line not an object":
        test.write_text(f"{lines[0]}\n\n[1, 2]\n", encoding="utf-8")
        expected = [f"{test}:3: expected a JSON object, got list", "fix or delete that line"]
    elif case == "non-UTF-8 line":
        test.write_bytes(f"{lines[0]}\n".encode() + lines[1].encode("gbk") + b"\n")
        expected = [f"{test}:2: not UTF-8", "convert the file to UTF-8"]
    elif case == "misspelled param":
        test.write_text("\n".join(lines) + "\n", encoding="utf-8")
        params = params_file(tmp_path, evaluate={"num_sample": 10})
        expected = ["params.yaml 'evaluate:'", "'num_sample' (did you mean 'num_samples'?)"]
    else:
        test.write_text("\n".join(lines) + "\n", encoding="utf-8")
        expected = [f"{tmp_path / 'no-model'}: model directory not found", "dvc repro train"]
    metrics, out_dir, hyps = tmp_path / "metrics.json", tmp_path / "evaluate", tmp_path / "hyps.jsonl"
    error = run_cli("evaluate", "--test", test, "--model", tmp_path / "no-model", "--metrics", metrics,
                    "--out-dir", out_dir, "--hypotheses", hyps, "--params", params)
    assert all(e in error for e in expected), error
    assert not metrics.exists() and not out_dir.exists() and not hyps.exists()


# ----------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("case", ["missing model", "model without training_config.json", "bad dtype", "misspelled param"])
def test_cli_export_bad_input(tmp_path, case):
    model = tmp_path / "adapter"
    params = params_file(tmp_path)
    if case == "missing model":
        expected = [f"{model}: model directory not found", "dvc repro train"]
    elif case == "model without training_config.json":
        model.mkdir()
        expected = [f"{model / 'training_config.json'}: not found", "train stage"]
    elif case == "bad dtype":
        params = params_file(tmp_path, export={"dtype": "fp32"})
        expected = ["params.yaml", "export.dtype must be one of bf16, fp16", "'fp32'"]
    else:
        params = params_file(tmp_path, export={"dtyp": "bf16"})
        expected = ["params.yaml 'export:'", "'dtyp' (did you mean 'dtype'?)"]
    out, report = tmp_path / "export", tmp_path / "export.json"
    error = run_cli("export", "--model", model, "--out", out, "--report", report, "--params", params)
    assert all(e in error for e in expected), error
    assert not out.exists() and not report.exists() and not (tmp_path / ".export.tmp").exists()


# ----------------------------------------------------------------------------------------------
# translate


@pytest.mark.parametrize("case", ["missing input file", "GBK input file", "missing model", "model without training_config.json",
                                  "bad batch size"])
def test_cli_translate_bad_input(tmp_path, case):
    model, text, out = tmp_path / "adapter", tmp_path / "in.txt", tmp_path / "out.txt"
    text.write_text("学而时习之。\n", encoding="utf-8")
    extra = []
    if case == "missing input file":
        text = tmp_path / "nope.txt"
        expected = [f"{text}: input file not found", "check the path"]
    elif case == "GBK input file":
        text.write_bytes("学而时习之。\n".encode("gbk"))
        expected = [f"{text}:1: not UTF-8", "iconv"]
    elif case == "missing model":
        expected = [f"{model}: model directory not found", "dvc repro train", "--model"]
    elif case == "model without training_config.json":
        model.mkdir()
        expected = [f"{model / 'training_config.json'}: not found", "train stage"]
    else:
        extra = ["--batch-size", "0"]
        expected = ["--batch-size must be >= 1"]
    error = run_cli("translate", "--input", text, "--output", out, "--model", model, *extra)
    assert all(e in error for e in expected), error
    assert not out.exists()
