"""Files of a folder or an archive (.tar, .tar.gz, .tar.xz, .tar.bz2, .zip), streamed one at a time, never unpacked
to disk, with one set of rules for links, sizes and damage (ingest reads its niutrans sources through this).

    for rel, load, problem in iter_files(Path("corpus.tar.xz")):     # every file: (relative path, load, problem)
    for rel, text in iter_text_files(Path("books/"), (".txt",), "utf-8", skipped=...):   # readable text files

Every entry comes out as (relative path, load, problem): `problem` is None for a regular file that `load()` reads,
else the reason it cannot be read ("dangling link: ...", "not a regular file: fifo", "too large: ..."), which the
caller counts as a skipped file. Links are read where they resolve inside the directory or archive (hard links in
a tar, symlinks in a tar, a zip or a directory, also to directories); nothing outside the root is ever opened, and
only regular files are opened at all (a FIFO would block for ever, a device file never ends). A file over
MAX_FILE_BYTES is not read. A cut or damaged archive is one PipelineError naming it, wherever the damage is (gzip,
xz and bz2 CRCs are checked; a plain .tar has none). File and member names stored in GBK are decoded as such.

Bombs (a few kB that would expand to gigabytes in memory): an archive may expand, as it is read, to at most
expansion_budget(its size) bytes: every member of a tar stream (read or not: the stream decompresses it), every read
of a zip member, every read through a link (a thousand hard links to one member are a thousand copies of its text
in the reader's hands), all counted; past it the archive is one PipelineError. Links may make at most
MAX_LINK_PATHS paths (directory links nested in each other multiply). Zip entries whose data overlap (two entries
on one local header, or a header inside another entry's data: the non-recursive zip bomb, which no zip tool
writes) are refused before any is read, as newer Pythons' zipfile does. A member name given twice is yielded twice,
in archive order: the readers (ingest's NiutransReader, pretrain's monolingual.read_tree) use the later one, as
`tar x` does, and count the earlier as REPLACED.
"""

from __future__ import annotations

import bisect
import bz2
import codecs
import contextlib
import gzip
import io
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from wenyan.errors import PipelineError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".zip")
MAX_FILE_BYTES = 1 << 30  # a file or archive member is read whole: one larger than 1 GiB is skipped (niutrans)
#                           or refused (tsv/jsonl); 史记's largest chapter file is ~100 kB
MAX_LINK_HOPS = 40  # links followed in one path, as Linux's limit (ELOOP)
MAX_EXPANSION = 100  # an archive expands to at most 100 x its size as it is read: text compresses 3-5x (xz), a bomb
#                      1,000x and more (a 9 kB archive reached 3.3 GB in pretrain)
MIN_EXPANSION_BYTES = 128 << 20  # ... and to 128 MiB whatever its size (a small archive of real text stays far below)
MAX_LINK_PATHS = 1_000_000  # paths links may make in one archive (the monolingual corpus has ~10k chapter files)
REPLACED = "replaced by a later archive member of the same name (as tar x)"  # why an earlier member is not used


def archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if any(name.endswith(s) for s in ARCHIVE_SUFFIXES):
        return "tar"
    return None


def text_name(name: str, raw: bytes | None = None) -> str:
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
    return text_name(info.filename, info.filename.encode("cp437", errors="replace"))


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


def expansion_budget(size: int) -> int:
    """The bytes an archive of `size` bytes may expand to as it is read (the module docstring)."""
    return max(MIN_EXPANSION_BYTES, MAX_EXPANSION * size)


class _Budget:
    """What an archive has expanded to so far, against expansion_budget."""

    def __init__(self, path: Path):
        self.path, self.size = path, path.stat().st_size
        self.limit, self.used = expansion_budget(self.size), 0

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise PipelineError(
                f"{self.path}: expands to more than {self.limit:,} bytes as it is read (the limit for an archive of "
                f"{self.size:,} bytes: {MAX_EXPANSION}x its size, at least {MIN_EXPANSION_BYTES:,}; members given many "
                f"times, links to one member, data far more compressible than text): a zip or tar bomb? Unpack it "
                f"with a tool you trust and give the directory as the source")

    def read(self, size: int, load: Callable[[], bytes]) -> bytes:
        self.spend(size)
        return load()


def size_problem(size: int) -> str | None:
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


def _link_files(entries: dict[str, _Entry], path: Path) -> list[tuple[str, str | None, str | None]]:
    """Every path a link makes readable: [(path, target member or None, problem or None)].

    A link to a directory makes every file below it readable below the link, as a filesystem would. More than
    MAX_LINK_PATHS paths (links to directories that hold links to directories multiply) is one PipelineError."""
    dirs = {"/".join(name.split("/")[:i]) for name in entries for i in range(1, name.count("/") + 1)}
    names = sorted(entries)  # the members below a directory d: the names from d + "/" up to d + "0" ("/" + 1)
    found = []
    visits = 0

    def count() -> None:
        if visits + len(found) > MAX_LINK_PATHS:
            raise PipelineError(f"{path}: its links make more than {MAX_LINK_PATHS:,} paths (links to directories that "
                                f"hold links to directories multiply): a link bomb? Unpack it with a tool you trust "
                                f"and give the directory as the source")

    def visit(rel: str, depth: int) -> None:
        nonlocal visits
        visits += 1
        count()
        kind, value = _resolve(rel, entries, dirs)
        if kind == "file":
            found.append((rel, value, size_problem(entries[value].size)))
        elif kind == "problem":
            found.append((rel, None, value))
        elif depth >= MAX_LINK_HOPS or not value or rel == value or rel.startswith(value + "/"):
            found.append((rel, None, f"link loop: {rel} -> {value}"))
        else:
            for name in names[bisect.bisect_left(names, value + "/") : bisect.bisect_left(names, value + "0")]:
                if entries[name].kind == "file":
                    found.append((rel + name[len(value) :], name, size_problem(entries[name].size)))
                    count()
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


def _iter_tar(path: Path, wanted, show_progress: bool, budget: _Budget):
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
                budget.spend(tarfile.BLOCKSIZE + member.size)  # its header and data, before the data is decompressed
                name = _member_path(text_name(member.name))
                if name is None:
                    yield text_name(member.name), None, f"member path outside the archive: {member.name}"
                    continue
                if not name:
                    continue
                kind = _tar_kind(member)
                entries[name] = _Entry(kind, text_name(member.linkname), member.size if kind == "file" else 0)
                if kind == "file":
                    problem = size_problem(member.size)
                    yield name, (None if problem else (lambda member=member: tar.extractfile(member).read())), problem
                elif kind.startswith("other"):
                    yield name, None, f"not a regular file: {kind[len('other: '):]}"
            # A cut in the tar's zero padding loses no member but is still a broken download.
            while chunk := tar.fileobj.read(1 << 20):
                budget.spend(len(chunk))
            if tar.fileobj.tell() % tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data (the archive's length is not a whole number of blocks)")
    links = _link_files(entries, path)
    needed = {target for rel, target, problem in links if target and not problem and wanted(rel)}
    data: dict[str, bytes] = {}
    if needed:  # a second pass reads the members that links point to (a stream cannot go back)
        with stream() as tar:
            for member in tar:
                name = _member_path(text_name(member.name))
                if name in needed and member.isfile():
                    data[name] = tar.extractfile(member).read()
    for rel, target, problem in links:  # each read through a link is one more copy in the reader's hands
        yield rel, (None if problem or target not in data
                    else (lambda target=target: budget.read(len(data[target]), lambda: data[target]))), problem


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.is_dir() or stat.S_ISDIR(mode):
        return "dir"
    if stat.S_IFMT(mode) == 0 or stat.S_ISREG(mode):  # no file type (zipfile.writestr) or no Unix mode (Windows)
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return f"other: {mode_name(mode)}"


def _overlap(infos: list[zipfile.ZipInfo]) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo] | None:
    """Two entries whose data overlap: one local header shared by two entries, or an entry's header inside the data
    before it. Each entry is taken to span at least its 30-byte local header and its compressed data (its name and
    extra field only add to that), so an ordinary zip never counts as overlapping."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for before, after in zip(ordered, ordered[1:]):
        if before.header_offset + 30 + before.compress_size > after.header_offset:
            return before, after
    return None


def _iter_zip(path: Path, wanted, show_progress: bool, budget: _Budget):
    from tqdm import tqdm

    entries: dict[str, _Entry] = {}
    infos: dict[str, zipfile.ZipInfo] = {}
    with zipfile.ZipFile(path) as zf:
        overlap = _overlap(zf.infolist())
        if overlap:
            first, second = (_zip_name(i) for i in overlap)
            how = ("share one local header" if overlap[0].header_offset == overlap[1].header_offset
                   else "overlap (the second one's header lies inside the first one's data)")
            raise PipelineError(f"{path}: zip entries {first!r} and {second!r} {how}: how a zip bomb is made, not "
                                f"what a zip tool writes; unpack it with a tool you trust and give the directory as the "
                                f"source")
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
                problem = size_problem(info.file_size)
                yield name, (None if problem else
                             (lambda info=info: budget.read(info.file_size, lambda: zf.read(info)))), problem
            elif kind.startswith("other"):
                yield name, None, f"not a regular file: {kind[len('other: '):]}"
        for rel, target, problem in _link_files(entries, path):
            info = infos.get(target)
            yield rel, (None if problem else
                        (lambda info=info: budget.read(info.file_size, lambda: zf.read(info)))), problem


def mode_name(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return what
    return f"file of mode {mode:o}"


def read_regular(real: str) -> bytes:
    """Read a regular file without following a link or blocking (a FIFO swapped in since the walk is refused)."""
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PipelineError(f"{real}: not a regular file ({mode_name(st.st_mode)}) any more")
        if size_problem(st.st_size):
            raise PipelineError(f"{real}: {size_problem(st.st_size)}")
        return f.read()


def _iter_dir(path: Path, show_progress: bool, must_be_files=()):
    """Walk a corpus directory in name order; links are followed only where they resolve inside it. A directory
    named like one of must_be_files is a problem, not walked."""
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
            rel = f"{rel_dir}/{text_name(name)}" if rel_dir else text_name(name)
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
                if name in must_be_files:
                    yield rel, None, f"not a regular file: {rel} is a directory"
                elif real in seen:
                    yield rel, None, f"link loop: {rel} -> {os.readlink(full)}"
                else:
                    yield from walk(real, rel, seen | {real}, bar)
            elif stat.S_ISREG(st.st_mode):
                bar.update()
                problem = size_problem(st.st_size)
                yield rel, (None if problem else (lambda real=real: read_regular(real))), problem
            else:
                yield rel, None, f"not a regular file: {mode_name(st.st_mode)}"

    with tqdm(desc=f"read {path}", unit="file", disable=None if show_progress else True) as bar:
        yield from walk(root, "", frozenset([root]), bar)


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


def iter_files(path: Path, wanted: Callable[[str], bool] = lambda rel: True, show_progress: bool = True, *,
               must_be_files: tuple[str, ...] = (), what: str = "a source") -> Iterator[tuple[str, Callable | None, str | None]]:
    """Yield (relative path with '/', load, problem) for every file of a directory or archive.

    `load()` returns the bytes (None where problem says why the file cannot be read); for a streamed tar
    it must be called before the next item (or never). `wanted(rel)` says which link targets a tar must
    read again in a second pass. must_be_files: file names that a directory must not have (a directory named
    source.txt is reported, not walked). `what` names the path in the error for one that is neither a directory
    nor an archive. A corrupt or cut archive is one PipelineError, whenever it shows."""
    if path.is_dir():
        yield from _iter_dir(path, show_progress, must_be_files)
        return
    kind = archive_kind(path)
    if kind is None or not path.is_file():
        it_is = "" if path.is_file() else f" (it is a {mode_name(path.stat().st_mode)})"
        raise PipelineError(
            f"{path}: {what} must be a directory or an archive ({', '.join(ARCHIVE_SUFFIXES)}){it_is}"
        )

    def guarded(load):
        def read():
            try:
                return load()
            except CORRUPT as exc:
                raise _corrupt(path, exc) from None
        return read

    budget = _Budget(path)  # what the archive may expand to (the module docstring's bombs)
    try:
        for rel, load, problem in (_iter_zip if kind == "zip" else _iter_tar)(path, wanted, show_progress, budget):
            yield rel, (guarded(load) if load else None), problem
    except CORRUPT as exc:
        raise _corrupt(path, exc) from None


def where(path: Path, rel: str) -> str:
    """How a file inside a directory or archive is named in messages: dir/rel, or archive:rel."""
    return f"{path}/{rel}" if path.is_dir() else f"{path}:{rel}"


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


def split_lines(text: str) -> list[str]:
    """Lines of a text file, without trailing blank lines (an editor's final newline is not a line)."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_text_file(path: Path, encoding: str, what: str = "a source") -> str:
    """One regular file (not a directory, FIFO or device; at most MAX_FILE_BYTES) as text (decode)."""
    if not path.is_file():
        raise PipelineError(f"{path}: {what} must be a regular file (it is a {mode_name(path.stat().st_mode)})")
    problem = size_problem(path.stat().st_size)
    if problem:
        raise PipelineError(f"{path}: {problem}; split it into several sources")
    return decode(read_regular(os.path.realpath(path)), str(path), encoding)


def iter_text_files(path: Path, suffixes: tuple[str, ...], encoding: str, skipped: Callable[[str, str], None],
                    show_progress: bool = True) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every readable file of a directory or archive whose name ends with one of suffixes
    (e.g. (".txt",)), in the order iter_files gives them (a directory: name order; an archive: member order);
    skipped(where, reason) is called for each such file that cannot be read (a link outside the root, a FIFO,
    too large, ...). A byte that is not `encoding` is an error naming the file and line."""
    def wanted(rel: str) -> bool:
        return rel.lower().endswith(tuple(s.lower() for s in suffixes))

    for rel, load, problem in iter_files(path, wanted, show_progress):
        if not wanted(rel):
            continue
        if problem:
            skipped(where(path, rel), problem)
            continue
        yield rel, decode(load(), where(path, rel), encoding)
