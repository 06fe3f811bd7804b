"""Bad paths given to the model-half commands (evaluate, evaluate_base, export, train, review) and profiles:
an output that is a directory (or a file where a directory goes), below a regular file, a device or a place
that cannot be written; an input JSONL that is a directory or a FIFO. Each is one `error:` line, found at
the start (before any model: --model does not even exist here), nothing written. translate: test_translate_io.py."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import jsonl_row, params_file, run_cli

from wenyan.errors import PipelineError
from tools.profile import read_profile

pytestmark = pytest.mark.bad_input


@pytest.fixture
def test_jsonl(tmp_path):
    import json

    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(jsonl_row(), ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def evaluate_args(tmp_path, test, **paths):
    args = {"metrics": tmp_path / "metrics.json", "out-dir": tmp_path / "evaluate", "hypotheses": tmp_path / "hyps.jsonl",
            **paths}
    return ["--test", test, "--model", tmp_path / "no-model", *[x for k, v in args.items() for x in (f"--{k}", v)],
            "--params", params_file(tmp_path)]


@pytest.mark.parametrize("case", ["metrics is a directory", "hypotheses below a file", "out-dir is a file",
                                  "metrics under /proc", "metrics is /dev/null", "test is a directory", "test is a FIFO"])
def test_cli_evaluate_bad_paths(tmp_path, test_jsonl, case):
    test, paths = test_jsonl, {}
    if case == "metrics is a directory":
        (tmp_path / "m").mkdir()
        paths, expected = {"metrics": tmp_path / "m"}, f"{tmp_path / 'm'}: is a directory, but this output is a file"
    elif case == "hypotheses below a file":
        paths = {"hypotheses": test_jsonl / "hyps.jsonl"}
        expected = f"{test_jsonl / 'hyps.jsonl'}: {test_jsonl} is a file, not a directory"
    elif case == "out-dir is a file":
        (tmp_path / "o").write_text("x")
        paths, expected = {"out-dir": tmp_path / "o"}, f"{tmp_path / 'o'}: is a file, but this output is a directory"
    elif case == "metrics under /proc":  # root cannot write there either
        paths, expected = {"metrics": "/proc/metrics.json"}, "/proc/metrics.json: cannot write in /proc ("
    elif case == "metrics is /dev/null":
        paths, expected = {"metrics": "/dev/null"}, "/dev/null: is a character device, but this output is a file"
    elif case == "test is a directory":
        test, expected = tmp_path, f"{tmp_path}: not a regular file (a directory); give the JSONL file"
    else:
        test = tmp_path / "fifo.jsonl"
        os.mkfifo(test)  # opening it would wait for a writer forever
        expected = f"{test}: not a regular file (a named pipe); give the JSONL file"
    args = evaluate_args(tmp_path, test, **paths)
    before = sorted(os.listdir(tmp_path))
    error = run_cli("evaluate", *args)
    assert error.startswith(f"error: {expected}"), error
    assert sorted(os.listdir(tmp_path)) == before and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_cli_evaluate_base_output_is_a_directory(tmp_path, test_jsonl):
    error = run_cli("evaluate_base", "--test", test_jsonl, "--base", tmp_path / "no-base", "--out", tmp_path,
                    "--params", params_file(tmp_path))
    assert error.startswith(f"error: {tmp_path}: is a directory, but this output is a file")


@pytest.mark.parametrize("case", ["report is a directory", "out is a file", "out under /proc"])
def test_cli_export_bad_paths(tmp_path, case):
    out, report = tmp_path / "export", tmp_path / "export.json"
    if case == "report is a directory":
        report.mkdir()
        expected = f"{report}: is a directory, but this output is a file"
    elif case == "out is a file":
        out.write_text("x")
        expected = f"{out}: is a file, but this output is a directory"
    else:
        out, expected = "/proc/export", "/proc/export: cannot write in /proc ("
    error = run_cli("export", "--model", tmp_path / "no-model", "--out", out, "--report", report,
                    "--params", params_file(tmp_path))
    assert error.startswith(f"error: {expected}"), error


@pytest.mark.parametrize("which", ["--out", "--checkpoints", "--reports"])
def test_cli_train_output_below_a_file(tmp_path, which):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    paths = {"--out": tmp_path / "adapter", "--checkpoints": tmp_path / "ckpt", "--reports": tmp_path / "reports",
             which: blocker / "sub"}
    error = run_cli("train", "--train", tmp_path / "train.jsonl", *[x for kv in paths.items() for x in kv],
                    "--params", params_file(tmp_path))
    assert error == f"error: {blocker / 'sub'}: {blocker} is a file, not a directory; give an output path in a directory"


@pytest.mark.parametrize("out", ["dir", "/dev/null"])
def test_cli_review_bad_out(tmp_path, out):
    target = tmp_path if out == "dir" else out
    error = run_cli("review", "--old", "HEAD", "--out", target)
    assert error.startswith(f"error: {target}: is {'a directory' if out == 'dir' else 'a character device'}, but this output is a file")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("text, message", [
    ("train.epochs: 2\ntrain.epochs: 3\n", "2: the key 'train.epochs' is given twice in one mapping \\(first on line 1\\)"),
    (b"format.system_prompt: \xff\n", "not UTF-8"),
])
def test_profile_duplicate_key_or_not_utf8(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PipelineError, match=f"^{path}:? ?{message}"):
        read_profile(str(path))


def test_profile_reads_1e_4_as_a_number(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train.learning_rate: 1e-4\n")
    assert read_profile(str(path)) == {"train.learning_rate": 1e-4}
