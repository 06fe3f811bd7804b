"""Ingest: read the parallel corpora listed in params.yaml `ingest.sources` into one table of pairs.

Inputs:  each source's `path`, in one of three formats:
           niutrans  the NiuTrans Classical-Modern layout, as a directory or straight from a .tar,
                     .tar.gz, .tar.xz or .zip of it (streamed, never unpacked to disk):
                       [双语数据/]<book>/<part>/.../<chapter>/source.txt + target.txt (line-aligned),
                       or bitext.txt (`古文：…` / `现代文：…` lines, pairs separated by blank lines)
                       where a chapter has no source.txt/target.txt
           tsv       source<TAB>target[<TAB>book[<TAB>chapter]], optional header line naming the columns
           jsonl     one object a line: {"source": ..., "target": ..., "book"?: ..., "chapter"?: ...}
Outputs: data/ingest/pairs.parquet, one row a sentence pair:
           id (str, unique)  "<corpus>/<book>/<chapter>#<line>"
           corpus (str)      the source's name: its directory/archive/file basename without extension
           book (str), chapter (str: path below the book, e.g. "七十列传/万石张叔列传")
           line (int)        1-based line number in source.txt (pair number in bitext.txt, line in tsv/jsonl)
           source (str)      classical Chinese, as read (clean normalises it)
           target (str)      modern Chinese, as read
         reports/data/ingest.json: pairs per source and per book, files read, files skipped and why.
Run:     python -m stages.ingest --out data/ingest/pairs.parquet --report reports/data/ingest.json
         (what `dvc repro ingest` runs; add --params FILE to read another params.yaml)

A UTF-8 BOM and CRLF line endings are accepted silently; trailing blank lines are ignored; a line that
is blank on both sides is not a pair and is skipped (counted); a pair blank on one side is kept for
clean to drop and count.

Links and odd files (niutrans): hard links and symlinks are read where they resolve inside the corpus
directory or archive (a linked book directory is a book under the link's name); a link pointing outside
it, a dangling link, a link loop, a FIFO, socket or device file, a directory named source.txt, an archive
member whose path climbs out with '..', and a file over MAX_FILE_BYTES (1 GiB) are never opened: they are
counted in the report's skipped_by_reason, with the chapter whose pair they break. Nothing outside the
corpus root is read. A cut or damaged archive is one `error:` line naming it, wherever the damage is
(gzip, xz and bz2 CRCs are checked; a plain .tar has none).
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import collections
import contextlib
import gzip
import io
import json
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.files import atomic_outputs, write_json
from wenyan.params import check_entry, check_params, load_params, Param, Str

log = get_logger("ingest")

SCHEMA = {"sources": Param((dict, list)), "on_misaligned": Str("error", "skip")}  # sources: {name: {path, ...}} or a list  # values and comments: params.yaml
SOURCE_DEFAULTS = {
    "path": "",
    "format": "niutrans",  # niutrans | tsv | jsonl
    "books": [],  # empty = all books
    "encoding": "utf-8",
    "name": "",  # corpus name in ids; empty = the path's basename without extension
}
FORMATS = ("niutrans", "tsv", "jsonl")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".zip")
STRIP_SUFFIXES = ARCHIVE_SUFFIXES + (".tsv", ".txt", ".jsonl", ".json")
BILINGUAL_DIR = "双语数据"  # the archive's top folder: 双语数据/<book>/...
PAIR_FILES = ("source.txt", "target.txt", "bitext.txt")
CHUNK_LINES = 100  # tsv/jsonl rows without a chapter are grouped into pseudo-chapters of 100 lines,
#                    so that split (which splits by chapter) can still spread them over train/valid/test
MAX_LISTED_SKIPS = 200  # files_skipped entries kept in the report; the counts are always complete
MAX_FILE_BYTES = 1 << 30  # a file or archive member is read whole: one larger than 1 GiB is skipped (niutrans)
#                           or refused (tsv/jsonl); 史记's largest chapter file is ~100 kB
MAX_LINK_HOPS = 40  # links followed in one path, as Linux's limit (ELOOP)


# ----------------------------------------------------------------------------------------------
# Decoding and line handling


def corpus_name(path: str) -> str:
    """`/x/classical-modern.tar.xz` -> `classical-modern`."""
    name = Path(path.rstrip("/\\")).name
    for suffix in sorted(STRIP_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def decode(data: bytes, where: str, encoding: str) -> str:
    """Bytes -> text with a BOM dropped and CRLF/CR turned into LF; a bad byte is an error naming the line."""
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PipelineError(
            f"{where}:{line}: not valid {encoding} (byte {data[exc.start]:#04x} at offset {exc.start}); "
            f"if this file uses another encoding, set `encoding:` for this source in params.yaml "
            f"ingest.sources (e.g. encoding: gbk)"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def split_lines(text: str) -> list[str]:
    """Lines of a text file, without trailing blank lines (an editor's final newline is not a line)."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def parse_bitext(text: str, where: str) -> tuple[list[str], list[str]]:
    """`古文：…` / `现代文：…` pairs separated by blank lines -> (sources, targets)."""
    sources, targets = [], []
    pending = None  # a 古文 line waiting for its 现代文
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped:
            continue
        for prefix, side in (("古文", "source"), ("现代文", "target")):
            if stripped.startswith(prefix) and stripped[len(prefix) : len(prefix) + 1] in ("：", ":"):
                body = stripped[len(prefix) + 1 :]
                break
        else:
            raise PipelineError(f"{where}:{lineno}: expected a line starting with 古文： or 现代文：, got {line[:40]!r}")
        if side == "source":
            if pending is not None:
                raise PipelineError(f"{where}:{lineno}: 古文： line follows another 古文： line without its 现代文：")
            pending = body
        else:
            if pending is None:
                raise PipelineError(f"{where}:{lineno}: 现代文： line without a 古文： line before it")
            sources.append(pending)
            targets.append(body)
            pending = None
    if pending is not None:
        raise PipelineError(f"{where}: ends with a 古文： line that has no 现代文： line")
    return sources, targets


# ----------------------------------------------------------------------------------------------
# NiuTrans layout: walk a directory or stream an archive, one chapter at a time
#
# Every entry comes out as (relative path, load, problem): `problem` is None for a regular file that
# `load()` reads, else the reason it cannot be read ("dangling link: ...", "not a regular file: fifo",
# ...), which read_niutrans counts as a skipped file. Links are read where they resolve inside the
# directory or archive (hard links in a tar, symlinks in a tar, a zip or a directory, also to directories);
# nothing outside the corpus root is ever opened, and only regular files are opened at all (a FIFO would
# block for ever, a device file never ends).


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if any(name.endswith(s) for s in ARCHIVE_SUFFIXES):
        return "tar"
    return None


def _text_name(name: str, raw: bytes | None = None) -> str:
    """A file or member name as text: names stored in GBK (Chinese Windows) are decoded as such."""
    if raw is None:
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:  # undecodable bytes kept as surrogates by os / tarfile
            raw = name.encode("utf-8", "surrogateescape")
    for enc in ("utf-8", "gbk"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            pass
    return raw.decode("utf-8", "replace")


def _zip_name(info: zipfile.ZipInfo) -> str:
    """Member name; zips made on Chinese Windows store GBK names without the UTF-8 flag."""
    if info.flag_bits & 0x800:
        return info.filename
    return _text_name(info.filename, info.filename.encode("cp437", errors="replace"))


def _member_path(name: str) -> str | None:
    """An archive member name -> 'a/b/c' ('./' and a leading '/' dropped, Windows '\\' read as '/'); None if '..' climbs out."""
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)  # "" for the archive's top directory itself ("./")


class _Entry(NamedTuple):
    kind: str  # file | dir | symlink | hardlink | other: <what>
    link: str = ""  # a link's target as stored
    size: int = 0


def _size_problem(size: int) -> str | None:
    if size > MAX_FILE_BYTES:
        return f"too large: {size:,} bytes (limit {MAX_FILE_BYTES:,} a file)"
    return None


def _resolve(path: str, entries: dict[str, _Entry], dirs: set[str], hops: int = 0) -> tuple[str, str]:
    """Follow links in an archive path -> ('file', member) | ('dir', path) | ('problem', reason)."""
    parts = path.split("/")
    for i in range(len(parts)):
        here = "/".join(parts[: i + 1])
        entry = entries.get(here)
        if entry is None or entry.kind not in ("symlink", "hardlink"):
            continue
        if hops >= MAX_LINK_HOPS:
            return "problem", f"link loop: {path}"
        if entry.kind == "hardlink":  # a hard link names another member, from the archive's top
            target = _member_path(entry.link)
        elif entry.link.startswith("/"):
            target = None  # an absolute symlink points outside the archive
        else:
            target = _member_path(posixpath.dirname(here) + "/" + entry.link)
        if target is None:
            return "problem", f"link outside the archive: {here} -> {entry.link}"
        rest = "/".join(p for p in [target, *parts[i + 1 :]] if p)
        if not rest:
            return "dir", ""  # the archive's top directory
        return _resolve(rest, entries, dirs, hops + 1)
    entry = entries.get(path)
    if entry is not None and entry.kind == "file":
        return "file", path
    if path in dirs or (entry is not None and entry.kind == "dir"):
        return "dir", path
    if entry is None:
        return "problem", f"dangling link: nothing at {path} in the archive"
    return "problem", f"not a regular file: {path} is a {entry.kind.removeprefix('other: ')}"


def _link_files(entries: dict[str, _Entry]) -> list[tuple[str, str | None, str | None]]:
    """Every path a link makes readable: [(path, target member or None, problem or None)].

    A link to a directory makes every file below it readable below the link, as a filesystem would."""
    dirs = {"/".join(name.split("/")[:i]) for name in entries for i in range(1, name.count("/") + 1)}
    found = []

    def visit(rel: str, depth: int) -> None:
        kind, value = _resolve(rel, entries, dirs)
        if kind == "file":
            found.append((rel, value, _size_problem(entries[value].size)))
        elif kind == "problem":
            found.append((rel, None, value))
        elif depth >= MAX_LINK_HOPS or not value or rel == value or rel.startswith(value + "/"):
            found.append((rel, None, f"link loop: {rel} -> {value}"))
        else:
            for name in sorted(n for n in entries if n.startswith(value + "/")):
                if entries[name].kind == "file":
                    found.append((rel + name[len(value) :], name, _size_problem(entries[name].size)))
                elif entries[name].kind != "dir":
                    visit(rel + name[len(value) :], depth + 1)

    for name, entry in entries.items():
        if entry.kind in ("symlink", "hardlink"):
            visit(name, 0)
    return found


class _TarInfo(tarfile.TarInfo):
    """tarfile ends an archive silently at a bad or cut header after the first member; make it an error."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a zero block: the archive's end marker
            raise
        except tarfile.EmptyHeaderError:
            if tar.offset == 0:
                raise
            raise tarfile.SubsequentHeaderError("unexpected end of data (no end-of-archive marker)") from None
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isfile():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    what = {tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device"}
    return f"other: {what.get(member.type, f'member of type {member.type!r}')}"


def _open_tar_stream(raw):
    """The uncompressed tar stream of an open .tar/.tar.gz/.tar.xz/.tar.bz2 (by magic bytes).

    gzip, xz and bz2 file objects check the stream's CRC and raise EOFError at a cut, which
    tarfile's own `r|gz` does not (it ignores gzip's CRC and trailer)."""
    head = raw.peek(6)[:6] if hasattr(raw, "peek") else b""
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    return contextlib.nullcontext(raw)


def _iter_tar(path: Path, wanted, show_progress: bool):
    from tqdm import tqdm

    entries: dict[str, _Entry] = {}

    @contextlib.contextmanager
    def stream(bar=None):
        with open(path, "rb") as f, io.BufferedReader(_CountingReader(f, bar)) as raw, _open_tar_stream(raw) as tar_bytes:
            with tarfile.open(fileobj=tar_bytes, mode="r|", tarinfo=_TarInfo, errors="surrogateescape") as tar:
                yield tar

    size = path.stat().st_size
    with tqdm(total=size, desc=f"read {path.name}", unit="B", unit_scale=True, disable=None if show_progress else True) as bar:
        with stream(bar) as tar:
            for member in tar:
                name = _member_path(_text_name(member.name))
                if name is None:
                    yield _text_name(member.name), None, f"member path outside the archive: {member.name}"
                    continue
                if not name:
                    continue
                kind = _tar_kind(member)
                entries[name] = _Entry(kind, _text_name(member.linkname), member.size if kind == "file" else 0)
                if kind == "file":
                    problem = _size_problem(member.size)
                    yield name, (None if problem else (lambda member=member: tar.extractfile(member).read())), problem
                elif kind.startswith("other"):
                    yield name, None, f"not a regular file: {kind[len('other: '):]}"
            # A cut in the tar's zero padding loses no member but is still a broken download.
            while tar.fileobj.read(1 << 20):
                pass
            if tar.fileobj.tell() % tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data (the archive's length is not a whole number of blocks)")
    links = _link_files(entries)
    needed = {target for rel, target, problem in links if target and not problem and wanted(rel)}
    data: dict[str, bytes] = {}
    if needed:  # a second pass reads the members that links point to (a stream cannot go back)
        with stream() as tar:
            for member in tar:
                name = _member_path(_text_name(member.name))
                if name in needed and member.isfile():
                    data[name] = tar.extractfile(member).read()
    for rel, target, problem in links:
        yield rel, (None if problem or target not in data else (lambda target=target: data[target])), problem


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.is_dir() or stat.S_ISDIR(mode):
        return "dir"
    if stat.S_IFMT(mode) == 0 or stat.S_ISREG(mode):  # no file type (zipfile.writestr) or no Unix mode (Windows)
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return f"other: {_mode_name(mode)}"


def _iter_zip(path: Path, wanted, show_progress: bool):
    from tqdm import tqdm

    entries: dict[str, _Entry] = {}
    infos: dict[str, zipfile.ZipInfo] = {}
    with zipfile.ZipFile(path) as zf:
        for info in tqdm(zf.infolist(), desc=f"read {path.name}", unit="file", disable=None if show_progress else True):
            raw_name = _zip_name(info)
            name = _member_path(raw_name)
            if name is None:
                yield raw_name, None, f"member path outside the archive: {raw_name}"
                continue
            if not name:
                continue
            kind, link = _zip_kind(info), ""
            if kind == "symlink":  # a zip symlink's data is its target path
                link = zf.read(info).decode("utf-8", "replace") if info.file_size <= 4096 else "/too-long"
            entries[name], infos[name] = _Entry(kind, link, info.file_size), info
            if kind == "file":
                problem = _size_problem(info.file_size)
                yield name, (None if problem else (lambda info=info: zf.read(info))), problem
            elif kind.startswith("other"):
                yield name, None, f"not a regular file: {kind[len('other: '):]}"
        for rel, target, problem in _link_files(entries):
            yield rel, (None if problem else (lambda target=target: zf.read(infos[target]))), problem


def _mode_name(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return what
    return f"file of mode {mode:o}"


def _read_regular(real: str) -> bytes:
    """Read a regular file without following a link or blocking (a FIFO swapped in since the walk is refused)."""
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PipelineError(f"{real}: not a regular file ({_mode_name(st.st_mode)}) any more")
        if _size_problem(st.st_size):
            raise PipelineError(f"{real}: {_size_problem(st.st_size)}")
        return f.read()


def _iter_dir(path: Path, show_progress: bool):
    """Walk a corpus directory in name order; links are followed only where they resolve inside it."""
    from tqdm import tqdm

    root = os.path.realpath(path)

    def inside(real: str) -> bool:
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    def walk(real_dir: str, rel_dir: str, seen: frozenset, bar):
        try:
            names = sorted(os.listdir(real_dir))
        except OSError as exc:
            yield rel_dir, None, f"unreadable directory: {exc.strerror}"
            return
        for name in names:
            full = os.path.join(real_dir, name)
            rel = f"{rel_dir}/{_text_name(name)}" if rel_dir else _text_name(name)
            try:
                st = os.lstat(full)
                real = full
                if stat.S_ISLNK(st.st_mode):
                    link = os.readlink(full)
                    real = os.path.realpath(full)
                    if not inside(real):
                        yield rel, None, f"link outside the corpus: {rel} -> {link}"
                        continue
                    if not os.path.lexists(real) or os.path.islink(real):
                        yield rel, None, f"dangling link: {rel} -> {link}"
                        continue
                    st = os.stat(real)
            except OSError as exc:  # a link loop (ELOOP), a file gone meanwhile, no permission
                yield rel, None, f"unreadable: {exc.strerror}"
                continue
            if stat.S_ISDIR(st.st_mode):
                if name in PAIR_FILES:
                    yield rel, None, f"not a regular file: {rel} is a directory"
                elif real in seen:
                    yield rel, None, f"link loop: {rel} -> {os.readlink(full)}"
                else:
                    yield from walk(real, rel, seen | {real}, bar)
            elif stat.S_ISREG(st.st_mode):
                bar.update()
                problem = _size_problem(st.st_size)
                yield rel, (None if problem else (lambda real=real: _read_regular(real))), problem
            else:
                yield rel, None, f"not a regular file: {_mode_name(st.st_mode)}"

    with tqdm(desc=f"read {path}", unit="file", disable=None if show_progress else True) as bar:
        yield from walk(root, "", frozenset([root]), bar)


def iter_files(path: Path, wanted=lambda rel: True, show_progress: bool = True):
    """Yield (relative path with '/', load, problem) for every file of a directory or archive.

    `load()` returns the bytes (None where problem says why the file cannot be read); for a streamed tar
    it must be called before the next item (or never). `wanted(rel)` says which link targets a tar must
    read again in a second pass. A corrupt or cut archive is one PipelineError, whenever it shows."""
    if path.is_dir():
        yield from _iter_dir(path, show_progress)
        return
    kind = _archive_kind(path)
    if kind is None or not path.is_file():
        what = "" if path.is_file() else f" (it is a {_mode_name(path.stat().st_mode)})"
        raise PipelineError(
            f"{path}: a niutrans source must be a directory or an archive ({', '.join(ARCHIVE_SUFFIXES)}){what}"
        )

    def guarded(load):
        def read():
            try:
                return load()
            except CORRUPT as exc:
                raise _corrupt(path, exc) from None
        return read

    try:
        for rel, load, problem in (_iter_zip if kind == "zip" else _iter_tar)(path, wanted, show_progress):
            yield rel, (guarded(load) if load else None), problem
    except CORRUPT as exc:
        raise _corrupt(path, exc) from None


# What a cut or damaged download raises somewhere in tarfile, zipfile, gzip, lzma, bz2 or zlib.
CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError, zlib.error, OSError, NotImplementedError, RuntimeError)


def _corrupt(path: Path, exc: BaseException) -> PipelineError:
    if isinstance(exc, RuntimeError) and "password" in str(exc):
        return PipelineError(f"{path}: encrypted archive ({exc}); unpack it and give the directory as the source")
    if isinstance(exc, NotImplementedError):
        return PipelineError(f"{path}: {exc} (an unusual zip method, or a damaged archive); unpack it and give the directory")
    return PipelineError(
        f"{path}: corrupt or truncated archive ({type(exc).__name__}: {exc}); download it again"
    )


class _CountingReader(io.RawIOBase):
    """Raw file wrapper that advances a tqdm bar (if any) by the compressed bytes read."""

    def __init__(self, raw, bar):
        self.raw, self.bar = raw, bar

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.raw.readinto(buffer)
        if self.bar is not None and n:
            self.bar.update(n)
        return n



def read_niutrans(path: Path, corpus: str, encoding: str, books: list[str], on_misaligned: str, stats: dict):
    """Return [(book, chapter, lines, sources, targets)] sorted by (book, chapter path) for one source.

    A chapter whose source.txt or target.txt cannot be read (a link outside the corpus, a FIFO, a
    directory, too large: see iter_files) is skipped: both its files are counted in the report."""
    wanted = set(books)
    available: set[str] = set()
    unreadable: dict[str, str] = {}  # book -> first reason one of its entries was skipped
    # chapter -> {file name: (path, bytes or None, problem or None)}
    pending: dict[tuple[str, str], dict[str, tuple[str, bytes | None, str | None]]] = {}
    done: set[tuple[str, str]] = set()
    chapters = []

    def where(rel: str) -> str:
        return f"{path}/{rel}" if path.is_dir() else f"{path}:{rel}"

    def skip(file: str, reason: str) -> None:
        stats["files_skipped"] += 1
        stats["skipped_by_reason"][reason.split(":")[0]] += 1
        if len(stats["skipped_files"]) < MAX_LISTED_SKIPS:
            stats["skipped_files"].append({"file": file, "reason": reason})
        log.warning("skipped %s: %s", file, reason)

    def book_parts(rel: str) -> list[str]:
        parts = rel.split("/")
        if BILINGUAL_DIR in parts[:-1]:
            return parts[parts.index(BILINGUAL_DIR) + 1 :]
        if len(parts) > 2 and parts[0] == corpus and not path.is_dir():
            return parts[1:]  # classical-modern.zip holding classical-modern/<book>/...
        return parts

    def relevant(rel: str) -> bool:
        parts = book_parts(rel)
        return len(parts) >= 2 and parts[-1] in PAIR_FILES and (not wanted or parts[0] in wanted)

    def finish(key, files, final) -> bool:
        """Turn one chapter's files into pairs; False while its other file may still come."""
        book, chapter = key
        if "source.txt" in files and "target.txt" in files:
            used = ["source.txt", "target.txt"]
        elif not final:
            return False  # wait for the other file of the pair
        elif "bitext.txt" in files:
            used = ["bitext.txt"]
        else:
            used = list(files)
        for name, (rel, _, problem) in files.items():
            if problem and name not in used:
                skip(where(rel), problem)
        bad = [(name, files[name]) for name in used if files[name][2]]
        if bad:  # count every file of the pair: the chapter is not read
            for name in used:
                rel, _, problem = files[name]
                skip(where(rel), problem or f"partner skipped: {bad[0][0]} beside it is {bad[0][1][2].split(':')[0]}")
            return True
        if used == ["source.txt", "target.txt"]:
            s_where, t_where = where(files["source.txt"][0]), where(files["target.txt"][0])
            src = split_lines(decode(files["source.txt"][1], s_where, encoding))
            tgt = split_lines(decode(files["target.txt"][1], t_where, encoding))
            stats["files_read"] += 2
            if not src or not tgt:
                empty = [w for w, lines in ((s_where, src), (t_where, tgt)) if not lines]
                for w in empty:
                    skip(w, "empty file")
                return True
            if len(src) != len(tgt):
                message = f"misaligned: {len(src):,} lines in {s_where} but {len(tgt):,} in {t_where}"
                if on_misaligned == "error":
                    raise PipelineError(f"{message}; fix the files or set ingest.on_misaligned: skip")
                skip(s_where, message)
                return True
            lines = list(range(1, len(src) + 1))
        elif used == ["bitext.txt"]:
            b_where = where(files["bitext.txt"][0])
            text = decode(files["bitext.txt"][1], b_where, encoding)
            stats["files_read"] += 1
            src, tgt = parse_bitext(text, b_where)
            if not src:
                skip(b_where, "empty file")
                return True
            lines = list(range(1, len(src) + 1))
        else:
            name, (rel, _, _) = next(iter(files.items()))
            other = "target.txt" if name == "source.txt" else "source.txt"
            message = f"misaligned: {where(rel)} has no {other} beside it (nor a bitext.txt)"
            if on_misaligned == "error":
                raise PipelineError(f"{message}; add it or set ingest.on_misaligned: skip")
            skip(where(rel), message)
            return True
        keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if s.strip() or t.strip()]
        if len(keep) != len(src):
            stats["blank_lines_skipped"] += len(src) - len(keep)
            src, tgt, lines = [src[i] for i in keep], [tgt[i] for i in keep], [lines[i] for i in keep]
        chapters.append((book, chapter, lines, src, tgt))
        return True

    def read_chapters(files) -> None:
        for rel, load, problem in files:
            parts = book_parts(rel)
            if problem and (len(parts) < 2 or parts[-1] not in PAIR_FILES):
                # not a chapter file (a linked book directory, a README): counted unless the books filter excludes it
                if not wanted or parts[0] in wanted:
                    unreadable.setdefault(parts[0], problem)
                    skip(where(rel), problem)
                continue
            if parts[-1] not in PAIR_FILES or len(parts) < 2:
                continue
            book, chapter = parts[0], "/".join(parts[1:-1])
            if wanted and book not in wanted:
                available.add(book)
                continue
            if problem:
                unreadable.setdefault(book, problem)
            else:
                available.add(book)
            key = (book, chapter)
            if key in done:
                continue  # a bitext.txt beside source.txt + target.txt already read
            pending.setdefault(key, {})[parts[-1]] = (rel, None if problem else load(), problem)
            if finish(key, pending[key], final=False):
                del pending[key]
                done.add(key)

    files = iter_files(path, relevant)
    try:
        read_chapters(files)
    except PipelineError:
        if not path.is_dir():  # bad text in an archive may be a damaged download: let the archive check itself first
            for _ in files:
                pass
        raise
    for key in sorted(pending):
        finish(key, pending.pop(key), final=True)

    if not available and not unreadable:
        raise PipelineError(
            f"{path}: no source.txt/target.txt or bitext.txt found; expected the NiuTrans layout "
            f"[{BILINGUAL_DIR}/]<book>/.../<chapter>/source.txt + target.txt"
        )
    missing = sorted(wanted - available)
    if missing:
        why = "; ".join(f"{b} was skipped ({unreadable[b]})" for b in missing if b in unreadable)
        raise PipelineError(
            f"{path}: book(s) {', '.join(missing)} not found (ingest.sources books filter)"
            + (f"; {why}" if why else "")
            + f"; available books: {', '.join(sorted(available)) or 'none'}"
        )
    chapters.sort(key=lambda c: (c[0], c[1].split("/")))
    return chapters


# ----------------------------------------------------------------------------------------------
# TSV and JSONL: one pair a line


def _chunk_chapter(line: int) -> str:
    start = (line - 1) // CHUNK_LINES * CHUNK_LINES + 1
    return f"lines-{start}-{start + CHUNK_LINES - 1}"


def parse_tsv(text: str, where: str, default_book: str) -> list[tuple[str, str | None, int, str, str]]:
    """-> [(book, chapter or None, line, source, target)]."""
    rows = []
    columns = None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if columns is None:
            names = [f.strip().lower() for f in fields]
            if "source" in names and "target" in names:
                unknown = set(names) - {"source", "target", "book", "chapter"}
                if unknown or len(set(names)) != len(names):
                    raise PipelineError(
                        f"{where}:{lineno}: header columns should be source, target and optionally book, "
                        f"chapter (each once); got {', '.join(names)}"
                    )
                columns = names
                continue
            if not 2 <= len(fields) <= 4:
                raise PipelineError(
                    f"{where}:{lineno}: expected 2 to 4 tab-separated columns (source, target[, book[, chapter]]), "
                    f"got {len(fields)}"
                )
            columns = ["source", "target", "book", "chapter"][: len(fields)]
        if len(fields) != len(columns):
            raise PipelineError(
                f"{where}:{lineno}: expected {len(columns)} tab-separated columns ({', '.join(columns)}), "
                f"got {len(fields)}"
            )
        row = dict(zip(columns, fields))
        rows.append((row.get("book") or default_book, row.get("chapter") or None, lineno, row["source"], row["target"]))
    return rows


def _is_text(value: str) -> bool:
    """False for a string holding lone surrogates (JSON's "\\ud800"), which no file or parquet can store."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_jsonl(text: str, where: str, default_book: str) -> list[tuple[str, str | None, int, str, str]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{where}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise PipelineError(f"{where}:{lineno}: expected a JSON object with source and target, got {type(obj).__name__}")
        for key in ("source", "target", "book", "chapter"):
            if key in ("source", "target") and key not in obj:
                keys = ", ".join(k.encode("utf-8", "backslashreplace").decode() for k in obj)
                raise PipelineError(f"{where}:{lineno}: no '{key}' field (has {keys or 'none'})")
            value = obj.get(key)
            if (value is not None or key in ("source", "target")) and not isinstance(value, str):
                got = "null" if value is None else f"{type(value).__name__} {json.dumps(value, ensure_ascii=False)[:40]}"
                raise PipelineError(f"{where}:{lineno}: '{key}' should be a string, got {got}")
            if isinstance(value, str) and not _is_text(value):
                raise PipelineError(
                    f"{where}:{lineno}: '{key}' holds a lone surrogate escape (such as \\ud800), which is not text; "
                    f"fix that line (a surrogate pair \\ud83d\\ude00 is fine)"
                )
        rows.append((obj.get("book") or default_book, obj.get("chapter") or None, lineno, obj["source"], obj["target"]))
    return rows


def read_lines_file(path: Path, fmt: str, corpus: str, encoding: str, books: list[str], stats: dict):
    """A .tsv or .jsonl source -> chapters like read_niutrans."""
    if not path.is_file():
        raise PipelineError(f"{path}: a {fmt} source must be a regular file (it is a {_mode_name(path.stat().st_mode)})")
    size = path.stat().st_size
    if _size_problem(size):
        raise PipelineError(f"{path}: {_size_problem(size)}; split it into several sources")
    text = decode(_read_regular(os.path.realpath(path)), str(path), encoding)
    stats["files_read"] += 1
    rows = (parse_tsv if fmt == "tsv" else parse_jsonl)(text, str(path), corpus)
    if not rows:
        stats["files_skipped"] += 1
        stats["skipped_by_reason"]["empty file"] += 1
        stats["skipped_files"].append({"file": str(path), "reason": "empty file"})
        log.warning("skipped %s: empty file", path)
        return []
    available = sorted({r[0] for r in rows})
    missing = sorted(set(books) - set(available))
    if missing:
        raise PipelineError(
            f"{path}: book(s) {', '.join(missing)} not found (ingest.sources books filter); "
            f"available books: {', '.join(available)}"
        )
    grouped: dict[tuple[str, str], list] = collections.defaultdict(list)
    for book, chapter, line, src, tgt in rows:
        if books and book not in books:
            continue
        if not (src.strip() or tgt.strip()):
            stats["blank_lines_skipped"] += 1
            continue
        grouped[(book, chapter or _chunk_chapter(line))].append((line, src, tgt))
    return [
        (book, chapter, [r[0] for r in items], [r[1] for r in items], [r[2] for r in items])
        for (book, chapter), items in sorted(grouped.items(), key=lambda kv: (kv[0][0], kv[0][1].split("/")))
    ]


# ----------------------------------------------------------------------------------------------
# Parameters and the table


def check_encoding(encoding, where: str, path: str) -> None:
    """An encoding name Python can decode text with: utf-8, gbk, gb18030, big5, utf-16, ..."""
    try:
        ok = isinstance(encoding, str) and codecs.lookup(encoding)._is_text_encoding
    except LookupError:
        ok = False
    if not ok:
        raise PipelineError(
            f"params.yaml '{where}.encoding' (source {path}): unknown encoding {encoding!r}; "
            f"use a text encoding such as utf-8, gbk, gb18030, big5 or utf-16"
        )


def check_sources(params: dict) -> list[dict]:
    """Validate every ingest.sources entry before reading anything."""
    if params["on_misaligned"] not in ("error", "skip"):
        raise PipelineError(f"params.yaml 'ingest.on_misaligned' should be error or skip, got {params['on_misaligned']!r}")
    given = params["sources"]
    if isinstance(given, dict):  # {name: {path, format, ...}}: the name in pair ids; flat columns in `dvc exp show`
        entries = []
        for name, entry in given.items():
            if not isinstance(entry, dict) or "name" in entry:
                raise PipelineError(f"params.yaml 'ingest.sources.{name}' should be a mapping of path, format, books, "
                                    f"encoding (its name is the key)")
            entries.append({**entry, "name": str(name)})
        keys = [str(name) for name in given]
    elif isinstance(given, list):
        entries, keys = given, [f"[{i}]" for i in range(len(given))]
    else:
        entries = keys = []
    if not entries:
        raise PipelineError("params.yaml 'ingest.sources' should be a non-empty mapping of name: {path, format, ...} "
                            "(or a list of {path, format, ...})")
    sources = []
    for key, entry in zip(keys, entries):
        where = f"ingest.sources{key}" if key.startswith("[") else f"ingest.sources.{key}"
        src = check_entry(entry, SOURCE_DEFAULTS, where)
        if not src["path"]:
            raise PipelineError(f"params.yaml '{where}' has no path")
        if src["format"] not in FORMATS:
            raise PipelineError(
                f"params.yaml '{where}.format' should be one of {', '.join(FORMATS)}, got {src['format']!r}"
            )
        check_encoding(src["encoding"], where, src["path"])
        if not isinstance(src["books"], list) or not all(isinstance(b, str) for b in src["books"]):
            raise PipelineError(f"params.yaml '{where}.books' should be a list of book names")
        if not Path(src["path"]).exists():
            raise PipelineError(f"{src['path']}: not found (params.yaml {where}.path)")
        src["name"] = src["name"] or corpus_name(src["path"])
        sources.append(src)
    return sources


def chapters_to_columns(corpus: str, chapters, columns: dict) -> None:
    """Append one source's chapters to the output columns."""
    for book, chapter, lines, src, tgt in chapters:
        prefix = f"{corpus}/{book}/{chapter}" if chapter else f"{corpus}/{book}"
        n = len(lines)
        columns["id"].extend([f"{prefix}#{line}" for line in lines])
        columns["corpus"].extend([corpus] * n)
        columns["book"].extend([book] * n)
        columns["chapter"].extend([chapter] * n)
        columns["line"].extend(lines)
        columns["source"].extend(src)
        columns["target"].extend(tgt)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="pairs parquet to write")
    parser.add_argument("--report", required=True, help="JSON report to write")
    parser.add_argument("--params", default=None, help="params.yaml to read instead of DVC's (tests, benchmarks)")
    parser.add_argument("--check-params", action="store_true", help="only check the parameters, then exit (the check_params stage)")
    args = parser.parse_args(argv)

    params = check_params(load_params("ingest", args.params), SCHEMA, "ingest")
    sources = check_sources(params)
    if args.check_params:
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {k: [] for k in ("id", "corpus", "book", "chapter", "line", "source", "target")}
    report_sources = []
    for src in sources:
        stats = {
            "files_read": 0,
            "files_skipped": 0,
            "skipped_by_reason": collections.Counter(),
            "skipped_files": [],
            "blank_lines_skipped": 0,
        }
        path = Path(src["path"])
        if src["format"] == "niutrans":
            chapters = read_niutrans(path, src["name"], src["encoding"], src["books"], params["on_misaligned"], stats)
        else:
            chapters = read_lines_file(path, src["format"], src["name"], src["encoding"], src["books"], stats)
        before = len(columns["id"])
        chapters_to_columns(src["name"], chapters, columns)
        per_book = collections.Counter()
        for book, _, lines, _, _ in chapters:
            per_book[book] += len(lines)
        pairs = len(columns["id"]) - before
        log.info(
            "%s: %s pairs from %s chapters of %s book(s); read %s files, skipped %s%s; %s blank lines skipped",
            src["path"], f"{pairs:,}", f"{len(chapters):,}", len(per_book), f"{stats['files_read']:,}",
            stats["files_skipped"],
            f" ({', '.join(f'{n} {r}' for r, n in stats['skipped_by_reason'].items())})" if stats["files_skipped"] else "",
            f"{stats['blank_lines_skipped']:,}",
        )
        report_sources.append(
            {
                "path": src["path"],
                "format": src["format"],
                "corpus": src["name"],
                "encoding": src["encoding"],
                "books_filter": src["books"],
                "pairs": pairs,
                "chapters": len(chapters),
                "files_read": stats["files_read"],
                "files_skipped": stats["files_skipped"],
                "skipped_by_reason": dict(stats["skipped_by_reason"]),
                "skipped_files": stats["skipped_files"],
                "blank_lines_skipped": stats["blank_lines_skipped"],
                "pairs_per_book": dict(sorted(per_book.items())),
            }
        )

    total = len(columns["id"])
    if total == 0:
        raise PipelineError("ingest read no pairs at all; check ingest.sources in params.yaml (see reports above)")
    if len(set(columns["id"])) != total:
        seen, dups = set(), []
        for i in columns["id"]:
            if i in seen:
                dups.append(i)
            seen.add(i)
        raise PipelineError(
            f"{len(dups):,} duplicate pair ids (e.g. {dups[0]}): two sources share a corpus name; "
            f"give one a distinct `name:` in ingest.sources"
        )

    table = pa.table(
        {
            "id": pa.array(columns["id"], pa.string()),
            "corpus": pa.array(columns["corpus"], pa.string()),
            "book": pa.array(columns["book"], pa.string()),
            "chapter": pa.array(columns["chapter"], pa.string()),
            "line": pa.array(columns["line"], pa.int64()),
            "source": pa.array(columns["source"], pa.string()),
            "target": pa.array(columns["target"], pa.string()),
        }
    )
    per_book_all = collections.Counter()
    for s in report_sources:
        for book, n in s["pairs_per_book"].items():
            per_book_all[f"{s['corpus']}/{book}"] += n
    report = {
        "pairs": total,
        "books": len(per_book_all),
        "files_read": sum(s["files_read"] for s in report_sources),
        "files_skipped": sum(s["files_skipped"] for s in report_sources),
        "on_misaligned": params["on_misaligned"],
        "sources": report_sources,
        "pairs_per_book": dict(sorted(per_book_all.items())),
    }
    with atomic_outputs(args.out, args.report) as (out_tmp, report_tmp):  # both change together, or neither
        pq.write_table(table, out_tmp)
        write_json(report_tmp, report)
    log.info("wrote %s pairs to %s", f"{total:,}", args.out)


if __name__ == "__main__":
    run_main(main)
