"""wenyan/files.py: atomic outputs never replace a device or a directory, and an OSError on a path is one error line
(the stages' and commands' output guards that build on them: tests/test_outputs.py, tests/test_cli_paths.py)."""

from __future__ import annotations

import os
import stat

import pytest

from wenyan import files
from wenyan.errors import PipelineError
from wenyan.files import atomic_outputs


def test_atomic_outputs_never_replace_a_device_or_directory(tmp_path):
    good, folder = tmp_path / "good.txt", tmp_path / "folder"
    good.write_text("old")
    folder.mkdir()
    for bad in (folder, "/dev/null"):
        with pytest.raises(PipelineError, match="but this output is a file"):
            with atomic_outputs(good, bad) as (a, b):
                a.write_text("new")
                b.write_text("new")
        assert good.read_text() == "old" and folder.is_dir() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(PipelineError, match=f"^{good / 'x'}: {good} is a file, not a directory"):
        with atomic_outputs(good / "x"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "good.txt"]


def test_with_path_errors_turns_an_os_error_on_a_path_into_one_line():
    def main(argv=None):
        raise OSError(40, "Too many levels of symbolic links", "/x/loop")

    with pytest.raises(PipelineError, match=r"^/x/loop: Too many levels of symbolic links$"):
        files.with_path_errors(main)([])

    def bug(argv=None):
        raise OSError("no path")

    with pytest.raises(OSError):  # a bug keeps its traceback
        files.with_path_errors(bug)([])
