"""translate's input and output files: --output checked before any model is loaded (never the input under any
name, a directory, a path below a file, an unwritable place), written atomically keeping the file's mode,
through a symlink (the link stays), to a device in place; empty input, lines and pieces with nothing to
translate; input files that are not regular files; messages that hold bytes that were not UTF-8."""

from __future__ import annotations

import io
import os
import stat
import sys

import pytest
from conftest import run_cli, spelled

from tools import translate
from wenyan.errors import PipelineError, run_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny tensors gain nothing from threads

TEXT = "学而时习之。\n有朋自远方来。\n"


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def refused(tmp_path, argv, match):
    """translate.main fails on argv with `match`, before any model is looked at (--model does not exist)."""
    with pytest.raises(PipelineError, match=match):
        translate.main([*argv, "--model", str(tmp_path / "no-model")])


# ----------------------------------------------------------------------------------------------
# --output


@pytest.mark.bad_input
@pytest.mark.parametrize("spelling", ["same path", "other spelling", "symlink", "hard link", "stdin redirected"])
def test_output_that_is_the_input_is_refused_before_anything(tmp_path, src, spelling, monkeypatch):
    (tmp_path / "sub").mkdir()
    argv = ["--input", str(src)]
    if spelling != "stdin redirected":
        out = spelled(src, {"same path": "same", "other spelling": "dotdot"}.get(spelling, spelling), tmp_path)
    else:
        monkeypatch.setattr(sys, "stdin", open(src, encoding="utf-8"))
        argv, out = [], src
    refused(tmp_path, [*argv, "--output", str(out)], r"writing the translation there would replace the text")
    assert src.read_text(encoding="utf-8") == TEXT and (out.is_symlink() or not spelling == "symlink")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"in.txt", "sub", out.name})  # no temporary file


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["directory", "below a regular file", "below a regular file, deeper", "proc",
                                  "empty", "link loop", "socket"])
def test_output_that_cannot_be_written_is_refused_before_the_model(tmp_path, src, case):
    if case == "directory":
        out, match = tmp_path, "is a directory; --output takes a file name"
    elif case.startswith("below a regular file"):
        out = src / "out.txt" if case == "below a regular file" else src / "a" / "b" / "out.txt"
        match = "(Not a directory|is a file, not a directory)"
    elif case == "proc":  # tests run as root: a read-only place root cannot write either (chmod 0500 would not do)
        out, match = "/proc/translate-out.txt", r"cannot write in /proc \("
    elif case == "empty":
        out, match = "", "--output is empty"
    elif case == "link loop":
        out = tmp_path / "loop"
        out.symlink_to(out)
        match = "cannot write the output there .*(symbolic links|Too many levels)"
    else:
        import socket

        out = tmp_path / "sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(out))
        match = "is a socket; --output takes a file name"
    refused(tmp_path, ["学而时习之。", "--output", str(out)], match)
    assert src.read_text(encoding="utf-8") == TEXT
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no probe or temporary file left


@pytest.mark.bad_input
def test_cli_output_is_input_one_error_line(tmp_path, src):
    (tmp_path / "sub").mkdir()
    out = f"{tmp_path}/sub/../in.txt"
    error = run_cli("translate", "--input", src, "--output", out, "--model", tmp_path / "no-model")
    assert error.startswith(f"error: {out}: is the input file {src}") and "Give another --output" in error
    assert src.read_text(encoding="utf-8") == TEXT


def test_output_atomic_keeps_mode_and_writes_through_links_and_devices(tiny_adapter, tmp_path, src, echo_generate):
    expected = "译学而时习之。\n译有朋自远方来。\n"
    out = tmp_path / "out.txt"
    out.write_text("old\n", encoding="utf-8")
    out.chmod(0o640)
    translate.main(["--input", str(src), "--output", str(out), "--model", str(tiny_adapter)])
    assert out.read_text(encoding="utf-8") == expected and stat.S_IMODE(out.stat().st_mode) == 0o640

    real = tmp_path / "real.txt"
    real.write_text("old\n", encoding="utf-8")
    link, dangling = tmp_path / "link.txt", tmp_path / "dangling.txt"
    link.symlink_to(real)
    dangling.symlink_to(tmp_path / "not-yet.txt")
    for path in (link, dangling):
        translate.main(["--input", str(src), "--output", str(path), "--model", str(tiny_adapter)])
        assert path.is_symlink() and path.read_text(encoding="utf-8") == expected  # the link stays a link
    assert real.read_text(encoding="utf-8") == expected and (tmp_path / "not-yet.txt").is_file()

    translate.main(["--input", str(src), "--output", "/dev/null", "--model", str(tiny_adapter)])
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device, not a regular file

    nested = tmp_path / "new" / "dir" / "out.txt"  # missing directories are made
    translate.main(["--input", str(src), "--output", str(nested), "--model", str(tiny_adapter)])
    assert nested.read_text(encoding="utf-8") == expected
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]


# ----------------------------------------------------------------------------------------------
# Input with nothing (or parts with nothing) to translate


@pytest.mark.bad_input
@pytest.mark.parametrize("text, expected", [
    ("", ""),
    ("\n", "\n"),
    ("\n\n\n", "\n\n\n"),
    ("   \n\t\n", "   \n\t\n"),
    ("……\n。。。\n——\n", "……\n。。。\n——\n"),
    ("「」\n", "「」\n"),
])
def test_nothing_to_translate_passes_through_unchanged(tiny_adapter, tmp_path, text, expected, echo_generate):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text(text, encoding="utf-8")
    translate.main(["--input", str(src), "--output", str(out), "--model", str(tiny_adapter)])
    assert out.read_text(encoding="utf-8") == expected
    assert echo_generate == []  # no model was needed


@pytest.mark.bad_input
def test_pieces_without_text_pass_through_aligned(tiny_adapter, tmp_path, echo_generate, capsys):
    translate.main(["学而时习之。……\n  \n有朋自远方来！！\n——", "--model", str(tiny_adapter)])
    assert echo_generate[-1]["sources"] == ["学而时习之。", "有朋自远方来！！"]
    assert capsys.readouterr().out == "译学而时习之。……\n  \n译有朋自远方来！！\n——\n"


def test_assemble_with_pieces_without_text():
    planned = [["甲。", "……"], [], ["。"], ["乙！"]]
    assert translate.assemble(planned, ["A", "B"]) == ["A……", "", "。", "B"]
    assert translate.assemble(planned, ["A", "B"], ["甲。……", " ", "。", "乙!"]) == ["A……", " ", "。", "B"]


# ----------------------------------------------------------------------------------------------
# Input files that are not regular UTF-8 files; text that was not UTF-8


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["fifo", "directory", "missing", "character device", "below a regular file", "link loop"])
def test_input_that_is_not_a_regular_file_is_one_clear_error(tmp_path, src, case):
    path = tmp_path / "x"
    if case == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever: refused without opening it
        match = "is a named pipe; give a UTF-8 text file"
    elif case == "directory":
        path, match = tmp_path, "is a directory; give a UTF-8 text file"
    elif case == "missing":
        match = "input file not found"
    elif case == "character device":
        path, match = "/dev/zero", "is a character device"
    elif case == "below a regular file":
        path, match = src / "x", r"cannot open the input file \(Not a directory\)"
    else:
        path.symlink_to(path)
        match = r"cannot open the input file \(Too many levels of symbolic links\)"
    refused(tmp_path, ["--input", str(path), "--output", str(tmp_path / "out.txt")], f"^{path}: {match}")
    assert not (tmp_path / "out.txt").exists()


def test_input_from_a_pipe_path_is_read(tiny_adapter, tmp_path, echo_generate):
    """`--input <(cmd)` names /dev/fd/N, a pipe: read, not refused as a FIFO."""
    read_end, write_end = os.pipe()
    os.write(write_end, "学而时习之。\n".encode())
    os.close(write_end)
    out = tmp_path / "out.txt"
    try:
        translate.main(["--input", f"/dev/fd/{read_end}", "--output", str(out), "--model", str(tiny_adapter)])
    finally:
        os.close(read_end)
    assert out.read_text(encoding="utf-8") == "译学而时习之。\n"


@pytest.mark.bad_input
def test_argument_that_was_not_utf8_is_a_clear_error(tmp_path):
    refused(tmp_path, ["学而\udcff时习之。"], r"the text argument is not UTF-8 \(character 3\)")


@pytest.mark.bad_input
def test_run_main_prints_lone_surrogates_safely(monkeypatch):
    """A message holding a lone surrogate (a file name that was not UTF-8) on a strict stderr: one line, escaped."""
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))

    def main(argv):
        raise PipelineError("/data/\udcff\udcfe.txt: input file not found")

    with pytest.raises(SystemExit) as exc:
        run_main(main, [])
    assert exc.value.code == 1
    assert raw.getvalue().decode("utf-8") == "error: /data/\\udcff\\udcfe.txt: input file not found\n"

    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw := io.BytesIO(), encoding="ascii", errors="strict"))
    with pytest.raises(SystemExit):
        run_main(lambda argv: (_ for _ in ()).throw(PipelineError("文言 \udcff")), [])
    assert raw.getvalue() == b"error: \\u6587\\u8a00 \\udcff\n"


@pytest.mark.bad_input
def test_cli_input_file_name_not_utf8(tmp_path):
    """A file name of bytes that are not UTF-8, missing: the error names it (escaped), no UnicodeEncodeError."""
    import subprocess

    from conftest import REPO

    name = os.fsencode(str(tmp_path)) + b"/\xff\xfe.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tools.translate", "--input", name, "--model", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.rstrip("\n").splitlines()[-1] == f"error: {tmp_path}/\\udcff\\udcfe.txt: input file not found; check the path (or give '-' to read standard input)"


@pytest.mark.bad_input
@pytest.mark.parametrize("flags", [["--max-new-tokens-factor", "nan"], ["--max-new-tokens-factor", "inf"],
                                   ["--max-new-tokens-factor", "-1"], ["--max-new-tokens-factor", "1e9"],
                                   ["--batch-size", "0"], ["--batch-size", "-3"]])
def test_bad_generation_flags_are_one_clear_error(tmp_path, flags):
    refused(tmp_path, ["学而时习之。", *flags], r"--batch-size must be >= 1 and --max-new-tokens-factor in \(0, 100.0\]")
