"""`python -m stages.<x>` with a bad input or a bad parameter, for format, evaluate, export and translate:
exit status 1, stderr ends with one `error:` line naming the file (and line, where there is one) and what
to do, no traceback, and nothing written. (ingest, clean and train: tests/test_reliability.py.)"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import BASE_PARAMS, REPO, shipped

pytestmark = pytest.mark.bad_input


def run_cli(stage, *args):
    """The last stderr line of a failing `python -m stages.<stage>` (or tools.<command>), checked to be the only
    `error:` line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    package = "tools" if (REPO / "tools" / f"{stage}.py").is_file() else "stages"
    proc = subprocess.run([sys.executable, "-m", f"{package}.{stage}", *map(str, args)], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], proc.stderr[-2000:]
    return lines[-1]


def params_file(tmp_path, **sections):
    params = copy.deepcopy(BASE_PARAMS)
    params.update(evaluate=shipped("evaluate"), export=shipped("export"))
    for name, values in sections.items():
        params[name] = {**params[name], **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def jsonl_row(i=1):
    return {"id": f"c/书/篇#{i}", "book": "书", "chapter": "篇", "line": i, "source": "学而时习之。", "target": "学了又时常温习。",
            "messages": [{"role": "user", "content": "翻译：学而时习之。"}, {"role": "assistant", "content": "学了又时常温习。"}]}


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
        expected = [f"{text}: not UTF-8", "iconv"]
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
