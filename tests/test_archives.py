"""wenyan/archives.py's text-file reader, the API other stages use for "every text file of a folder or an archive
with ingest's rules" (links inside only, no FIFO, damaged archives one error). Ingest's own cases: test_ingest.py."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pytest

from wenyan import archives
from wenyan.errors import PipelineError


def read_all(path):
    skipped = []
    texts = list(archives.iter_text_files(path, (".txt",), "utf-8", lambda where, why: skipped.append((where, why)),
                                          show_progress=False))
    return texts, skipped


def test_a_directory_gives_its_text_files_in_name_order_and_skips_links_out_and_fifos(tmp_path):
    root = tmp_path / "books"
    (root / "b").mkdir(parents=True)
    (root / "b" / "2.txt").write_text("乙\r\n", encoding="utf-8")
    (root / "a.txt").write_bytes("\ufeff甲".encode("utf-8"))
    (root / "notes.md").write_text("not text of the corpus", encoding="utf-8")
    (tmp_path / "outside.txt").write_text("外", encoding="utf-8")
    os.symlink(tmp_path / "outside.txt", root / "c.txt")
    os.symlink(root / "a.txt", root / "d.txt")  # a link inside the root is read
    os.mkfifo(root / "e.txt")
    texts, skipped = read_all(root)
    assert texts == [("a.txt", "甲"), ("b/2.txt", "乙\n"), ("d.txt", "甲")]
    assert [why.split(":")[0] for _, why in skipped] == ["link outside the corpus", "not a regular file"]


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_an_archive_gives_the_same_texts(tmp_path, kind):
    files = {"top/a.txt": "甲", "top/b/2.txt": "乙", "top/readme.md": "x"}
    path = tmp_path / f"books.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, text in files.items():
                zf.writestr(name, text.encode("utf-8"))
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name, text in files.items():
                data = text.encode("utf-8")
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    texts, skipped = read_all(path)
    assert texts == [("top/a.txt", "甲"), ("top/b/2.txt", "乙")] and not skipped


def test_a_cut_archive_and_bad_bytes_are_one_error_naming_the_file(tmp_path):
    path = tmp_path / "books.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        data = "甲".encode("utf-8") * 5000
        info = tarfile.TarInfo("a.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(PipelineError, match=r"cut.tar.gz: corrupt or truncated archive"):
        read_all(cut)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "gbk.txt").write_bytes("甲乙".encode("gbk"))
    with pytest.raises(PipelineError, match=r"d/gbk.txt:1: not valid utf-8"):
        read_all(tmp_path / "d")
