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


# ----------------------------------------------------------------------------------------------
# Bombs and repeated members: ingest (corpora.read_niutrans) and pretrain (monolingual.read_source) read archives
# through the same archives.iter_files, so they meet the same limits with the same error (issue 29, class 4)

BOOK = "论语"
CHAPTER = "甲。乙。丙。\n".encode("utf-8") * 4000  # 72 kB of text
INGEST_FILES = [f"top/双语数据/{BOOK}/学而篇/source.txt", f"top/双语数据/{BOOK}/学而篇/target.txt"]
PRETRAIN_FILE = f"top/古文原文/{BOOK}/学而/text.txt"


def make_tar(path, members):
    """members: [(name, bytes | ("hardlink" | "symlink" | "dir", target))], in archive order."""
    with tarfile.open(path, "w:xz" if path.name.endswith(".xz") else "w") as tf:
        for name, what in members:
            info = tarfile.TarInfo(name)
            if isinstance(what, bytes):
                info.size = len(what)
                tf.addfile(info, io.BytesIO(what))
            else:
                info.type = {"hardlink": tarfile.LNKTYPE, "symlink": tarfile.SYMTYPE, "dir": tarfile.DIRTYPE}[what[0]]
                info.linkname = what[1]
                tf.addfile(info)
    return path


def make_zip(path, members):
    """members: [(name, bytes | ("symlink", target))]."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, what in members:
            if isinstance(what, bytes):
                zf.writestr(name, what)
            else:
                info = zipfile.ZipInfo(name)
                info.external_attr = (0o120777 << 16)  # a symlink; its data is the target
                zf.writestr(info, what[1])
    return path


def both_readers(path):
    """[what ingest read, what pretrain read] of one archive: (result or the PipelineError's message, stats)."""
    from stages import ingest
    from wenyan import corpora, monolingual

    out = []
    for read, stats in ((lambda s: corpora.read_niutrans(path, "top", "utf-8", [], "error", s), ingest.new_stats()),
                        (lambda s: monolingual.read_source({"path": str(path), "format": "niutrans", "books": [],
                                                            "encoding": "utf-8", "field": "text"}, s),
                         monolingual.Stats())):
        try:
            out.append((read(stats), stats))
        except PipelineError as exc:
            out.append((str(exc), stats))
    return out


def chapters_of_both():
    return [(INGEST_FILES[0], CHAPTER), (INGEST_FILES[1], CHAPTER), (PRETRAIN_FILE, CHAPTER)]


BOMBS = {
    # 200 hard links to each chapter file: 200 copies of its text in the reader's hands, from a few kB
    "hard links": ("bomb.tar.xz", lambda: chapters_of_both() + [
        (name.replace("学而", f"第{i}"), ("hardlink", name)) for name in (*INGEST_FILES, PRETRAIN_FILE) for i in range(200)]),
    # the same member 200 times (a later member replaces the earlier, but each is decompressed and read)
    "repeated members": ("bomb.tar.xz", lambda: chapters_of_both() * 200),
    # one highly compressible member, read by neither reader: the stream still decompresses it
    "compressible xz": ("bomb.tar.xz", lambda: chapters_of_both() + [("top/README", b"\0" * (40 << 20))]),
    # zip symlinks to one member: each read decompresses it again
    "zip symlinks": ("bomb.zip", lambda: chapters_of_both() + [
        (name.replace("学而", f"第{i}"), ("symlink", "../" + "/".join(name.split("/")[-2:])))
        for name in (*INGEST_FILES, PRETRAIN_FILE) for i in range(200)]),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_bomb_is_one_error_for_ingest_and_pretrain_alike(tmp_path, monkeypatch, bomb):
    monkeypatch.setattr(archives, "MIN_EXPANSION_BYTES", 4 << 20)  # 4 MiB instead of 128 MiB: a fast test
    name, members = BOMBS[bomb]
    path = (make_zip if name.endswith(".zip") else make_tar)(tmp_path / name, members())
    assert path.stat().st_size < 120_000  # a few kB (the zip: its central directory) that would expand to 40+ MB
    limit = archives.expansion_budget(path.stat().st_size)  # 4 MiB, or 100 x the zip's 108 kB
    for result, _ in both_readers(path):
        assert isinstance(result, str) and result.startswith(f"{path}: expands to more than {limit:,} bytes as it is read")


def test_the_budget_is_100_times_an_archive_and_at_least_128_mib(tmp_path, monkeypatch):
    assert archives.expansion_budget(9_000) == 128 << 20  # the 9 kB archive that reached 3.3 GB
    assert archives.expansion_budget(10 << 30) == 1000 << 30
    # text compresses a few times, far inside 100x: with no floor at all, an archive of text still reads
    import random

    monkeypatch.setattr(archives, "MIN_EXPANSION_BYTES", 0)
    rng = random.Random(0)
    text = "".join(rng.choice("学而时习之不亦说乎有朋自远方来乐人不知愠君子") + ("。\n" if i % 20 == 19 else "")
                   for i in range(60_000)).encode("utf-8")
    path = make_tar(tmp_path / "ordinary.tar.xz", [(name, text) for name in (*INGEST_FILES, PRETRAIN_FILE)])
    assert path.stat().st_size * 4 < 3 * len(text)  # compressed over 4x, as text is
    (ingested, _), (pretrained, _) = both_readers(path)
    assert len(ingested) == 1 and len(pretrained) == 1


@pytest.mark.bad_input
def test_links_that_multiply_are_one_error_for_both_readers(tmp_path, monkeypatch):
    """Directory L<k> holds two links to L<k-1> (L0: the chapter): L<k> makes 2**k paths, 8k in all from 50 members."""
    monkeypatch.setattr(archives, "MAX_LINK_PATHS", 1000)
    members = chapters_of_both()
    for top, chapter in ((f"top/古文原文/{BOOK}", "学而"), (f"top/双语数据/{BOOK}", "学而篇")):
        for level in range(1, 13):
            below = f"L{level - 1}" if level > 1 else chapter
            members += [(f"{top}/L{level}/{side}", ("symlink", f"../{below}")) for side in "ab"]
    path = make_tar(tmp_path / "links.tar", members)
    for result, _ in both_readers(path):
        assert isinstance(result, str) and result.startswith(f"{path}: its links make more than 1,000 paths")


def zip_with_entries_on_one_stream(tmp_path):
    """A zip whose central directory names one member twice, both on the same local header (same-stream entries)."""
    path = make_zip(tmp_path / "same.zip", chapters_of_both())
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    start = int.from_bytes(data[end + 16 : end + 20], "little")
    first = data.find(b"PK\x01\x02", start)
    second = data.find(b"PK\x01\x02", first + 4)
    entry = data[first:second]  # the first entry of the central directory, given again
    directory = data[start:end] + entry
    count = int.from_bytes(data[end + 10 : end + 12], "little") + 1
    tail = bytearray(data[end:])
    tail[8:10] = tail[10:12] = count.to_bytes(2, "little")
    tail[12:16] = len(directory).to_bytes(4, "little")
    path.write_bytes(bytes(data[:start] + directory + tail))
    return path


def zip_with_overlapping_entries(tmp_path):
    """The first entry's data (as its central directory entry says) runs over the second entry's local header."""
    path = make_zip(tmp_path / "overlap.zip", chapters_of_both())
    data = bytearray(path.read_bytes())
    entry = data.find(b"PK\x01\x02")
    data[entry + 20 : entry + 24] = (int.from_bytes(data[entry + 20 : entry + 24], "little") + 4096).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.bad_input
@pytest.mark.parametrize("make, how", [(zip_with_entries_on_one_stream, "share one local header"),
                                       (zip_with_overlapping_entries, "overlap")])
def test_overlapping_zip_entries_are_refused_by_both_readers_before_reading(tmp_path, make, how):
    path = make(tmp_path)
    with zipfile.ZipFile(path) as zf:  # what the readers would otherwise get: Python 3.11's zipfile reads them
        assert len(zf.infolist()) in (3, 4)
    for result, stats in both_readers(path):
        assert isinstance(result, str) and result.startswith(f"{path}: zip entries ") and how in result
    assert not both_readers(path)[1][1].files_read  # nothing was read first


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_member_given_twice_the_later_is_used_and_counted_by_both_readers(tmp_path, kind):
    newer = "新的一句。\n".encode("utf-8") * 4000  # as many lines as target.txt
    members = chapters_of_both() + [(INGEST_FILES[0], newer), (PRETRAIN_FILE, newer)]
    if kind == "zip":
        with pytest.warns(UserWarning, match="Duplicate name"):
            path = make_zip(tmp_path / "twice.zip", members)
    else:
        path = make_tar(tmp_path / "twice.tar", members)
    (ingested, ingest_stats), (pretrained, pretrain_stats) = both_readers(path)
    assert set(ingested[0][3]) == {"新的一句。"} and [set(lines) for _, lines in pretrained] == [{"新的一句。"}]
    assert ingest_stats["not_used_by_reason"][archives.REPLACED] == 1
    assert pretrain_stats.report()["not_used_by_reason"] == {archives.REPLACED: 1}
