"""Readers of parallel corpora, for the ingest stage: the NiuTrans Classical-Modern layout (from a directory or
straight from a .tar/.tar.gz/.tar.xz/.zip, streamed by wenyan/archives.py), TSV and JSONL. Each returns
[(book, chapter, lines, sources, targets)] sorted by (book, chapter) and fills a stats dict (ingest.new_stats)
with what it read, skipped and did not use, and why.

Nothing is dropped silently: what is read but not used is counted by reason in the report
(not_used_by_reason, with examples), by these rules:
  - an archive member given twice (a tar with a newer member appended): the later one is used, as `tar x`;
  - the same chapter under 双语数据/ and outside it (at the archive's top): the 双语数据/ copy is used;
  - an archive whose every chapter lies in one top folder of another name, with no 双语数据/ (a download's
    wrapper folder such as classical-modern-main/): that folder is not a book, the books are below it;
  - a file that is not source.txt, target.txt or bitext.txt (README, 数据来源.txt, ...); a bitext.txt
    beside source.txt + target.txt; files of books the books filter leaves out;
  - tsv: the header line repeated further down (files joined with cat) is skipped; without a header a file
    has two columns, so 3 or 4 on the first line (a tab inside a sentence?) is an error asking for a header,
    and any line with another number of columns than the header's is an error;
  - jsonl: a key given twice in one object is an error (JSON readers keep the last value silently).
A UTF-8 BOM and CRLF line endings are accepted silently; trailing blank lines are ignored; a line that
is blank on both sides is not a pair and is skipped (counted); a pair blank on one side is kept for
clean to drop and count.

Links and odd files (niutrans): hard links and symlinks are read where they resolve inside the corpus
directory or archive (a linked book directory is a book under the link's name); a link pointing outside
it, a dangling link, a link loop, a FIFO, socket or device file, a directory named source.txt, an archive
member whose path climbs out with '..', and a file over archives.MAX_FILE_BYTES (1 GiB) are never opened: they are
counted in the report's skipped_by_reason, with the chapter whose pair they break. Nothing outside the
corpus root is read. A cut or damaged archive is one `error:` line naming it, wherever the damage is
(gzip, xz and bz2 CRCs are checked; a plain .tar has none). These rules are wenyan/archives.py's, which streams
the directory or archive; this stage reads the NiuTrans layout from it (NiutransReader).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from wenyan import archives
from wenyan.errors import PipelineError, get_logger

log = get_logger("ingest")

STRIP_SUFFIXES = archives.ARCHIVE_SUFFIXES + (".tsv", ".txt", ".jsonl", ".json")
BILINGUAL_DIR = "双语数据"  # the archive's top folder: 双语数据/<book>/...
PAIR_FILES = ("source.txt", "target.txt", "bitext.txt")
CHUNK_LINES = 100  # tsv/jsonl rows without a chapter are grouped into pseudo-chapters of 100 lines,
#                    so that split (which splits by chapter) can still spread them over train/valid/test
MAX_DEPTH = 64  # directory levels below a niutrans source (its layout has ~6); deeper is an error, not a crash
MAX_LISTED_SKIPS = 200  # files_skipped entries kept in the report; the counts are always complete


# ----------------------------------------------------------------------------------------------
# Names and line handling


def corpus_name(path: str) -> str:
    """`/x/classical-modern.tar.xz` -> `classical-modern`."""
    name = Path(path.rstrip("/\\")).name
    for suffix in sorted(STRIP_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


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
# NiuTrans layout: one chapter at a time, from a directory or an archive (wenyan/archives.py streams it)


def skip(stats: dict, file: str, reason: str) -> None:
    """Count a file that is not read, by the reason's first word(s), and list it (the first MAX_LISTED_SKIPS)."""
    stats["files_skipped"] += 1
    stats["skipped_by_reason"][reason.split(":")[0]] += 1
    if len(stats["skipped_files"]) < MAX_LISTED_SKIPS:
        stats["skipped_files"].append({"file": file, "reason": reason})
    log.warning("skipped %s: %s", file, reason)


class NiutransReader:
    """One niutrans source, read chapter by chapter as the walk of its directory or archive goes (read_niutrans).

    A chapter's files come one at a time (an archive is streamed, in its own order): each waits in `files_of` until
    its partner comes (source.txt + target.txt), or until the walk ends (a bitext.txt, or a file whose partner never
    came), then becomes the chapter's entry of `chapters`; a later member of the same name, or the chapter's copy
    under 双语数据/, replaces it (the module docstring's rules; what is not used is counted by not_used).
    `available` and `unreadable` record the books seen, for the books filter's errors."""

    def __init__(self, path: Path, corpus: str, encoding: str, books: list[str], on_misaligned: str, stats: dict):
        self.path, self.corpus, self.encoding, self.on_misaligned, self.stats = path, corpus, encoding, on_misaligned, stats
        self.wanted = set(books)
        self.available: set[str] = set()
        self.unreadable: dict[str, str] = {}  # book -> first reason one of its entries was skipped
        # chapter -> {file name: (path, bytes or None, problem or None)}
        self.files_of: dict[tuple[str, str], dict[str, tuple[str, bytes | None, str | None]]] = {}
        self.origin: dict[tuple[str, str], bool] = {}  # chapter -> its files lie under 双语数据/
        self.done: set[tuple[str, str]] = set()
        self.chapters: dict[tuple[str, str], tuple[str, str, list[int], list[str], list[str]]] = {}

    def where(self, rel: str) -> str:
        return archives.where(self.path, rel)

    def skip(self, rel: str, reason: str) -> None:
        skip(self.stats, self.where(rel), reason)

    def not_used(self, rel: str, reason: str, quiet: bool = False) -> None:
        """A file read (or seen) but not used, by a documented rule: counted by reason in the report."""
        stats = self.stats
        stats["not_used_by_reason"][reason] += 1
        if len(stats["not_used_examples"]) < MAX_LISTED_SKIPS and stats["not_used_by_reason"][reason] <= 20:
            stats["not_used_examples"].append({"file": self.where(rel), "reason": reason})
        if not quiet:
            log.warning("not used: %s: %s", self.where(rel), reason)

    def book_parts(self, rel: str) -> list[str]:
        """[book, part, ..., chapter, file name] of a path below the corpus root."""
        parts = rel.split("/")
        if BILINGUAL_DIR in parts[:-1]:
            return parts[parts.index(BILINGUAL_DIR) + 1 :]
        if len(parts) > 2 and parts[0] == self.corpus and not self.path.is_dir():
            return parts[1:]  # classical-modern.zip holding classical-modern/<book>/...
        return parts

    def relevant(self, rel: str) -> bool:
        parts = self.book_parts(rel)
        return len(parts) >= 2 and parts[-1] in PAIR_FILES and (not self.wanted or parts[0] in self.wanted)

    def read(self) -> list[tuple[str, str, list[int], list[str], list[str]]]:
        """[(book, chapter, lines, sources, targets)] sorted by (book, chapter path)."""
        if self.path.is_dir():
            check_depth(self.path)
        files = archives.iter_files(self.path, self.relevant, must_be_files=PAIR_FILES, what="a niutrans source")
        try:
            for rel, load, problem in files:
                self.add(rel, load, problem)
        except PipelineError:
            if not self.path.is_dir():  # bad text in an archive may be a damaged download: let the archive check itself first
                for _ in files:
                    pass
            raise
        for key in sorted(k for k in self.files_of if k not in self.done):
            self.finish(key, self.files_of[key], final=True)
        chapters = self.unwrap(list(self.chapters.values()))
        self.check_books()
        chapters.sort(key=lambda c: (c[0], c[1].split("/")))
        return chapters

    def unwrap(self, chapters: list[tuple]) -> list[tuple]:
        """An archive with one top folder of another name and no 双语数据/: that folder is a wrapper, not a book."""
        if self.path.is_dir() or self.wanted or any(self.origin.values()) or not chapters:
            return chapters
        tops = {c[0] for c in chapters}
        if len(tops) != 1 or not all("/" in c[1] for c in chapters):
            return chapters
        top = tops.pop()
        chapters = [(c[1].split("/", 1)[0], c[1].split("/", 1)[1], *c[2:]) for c in chapters]
        self.stats["wrapper_folder"] = top
        log.info("%s: every chapter lies in %s/ and there is no %s/: %s/ is taken for the archive's wrapper "
                 "folder, not a book (%d books below it)", self.path, top, BILINGUAL_DIR, top, len({c[0] for c in chapters}))
        self.available.discard(top)
        self.available.update(c[0] for c in chapters)
        return chapters

    def add(self, rel: str, load, problem: str | None) -> None:
        """One entry of the walk: a chapter file (read now: a streamed archive cannot come back), or another file."""
        parts = self.book_parts(rel)
        if problem and (len(parts) < 2 or parts[-1] not in PAIR_FILES):
            # not a chapter file (a linked book directory, a README): counted unless the books filter excludes it
            if not self.wanted or parts[0] in self.wanted:
                self.unreadable.setdefault(parts[0], problem)
                self.skip(rel, problem)
            return
        if parts[-1] not in PAIR_FILES or len(parts) < 2:  # counted, never passed over silently
            if self.wanted and len(parts) >= 2 and parts[0] not in self.wanted:
                self.not_used(rel, "book not in the books filter", quiet=True)
            elif parts[-1] == "数据来源.txt":
                self.not_used(rel, "chapter provenance (数据来源.txt)", quiet=True)
            else:
                self.not_used(rel, "not a chapter file (only source.txt + target.txt or bitext.txt are read)")
            return
        book, chapter = parts[0], "/".join(parts[1:-1])
        if self.wanted and book not in self.wanted:
            self.available.add(book)
            self.not_used(rel, "book not in the books filter", quiet=True)
            return
        if problem:
            self.unreadable.setdefault(book, problem)
        else:
            self.available.add(book)
        self.add_file((book, chapter), parts[-1], rel, load, problem)

    def add_file(self, key: tuple[str, str], name: str, rel: str, load, problem: str | None) -> None:
        """A chapter file of a wanted book, by the module docstring's rules (双语数据/ copy wins, a later member of
        the same name replaces the earlier, a bitext.txt beside source.txt + target.txt is not used)."""
        bilingual = BILINGUAL_DIR in rel.split("/")[:-1]
        if key in self.origin and self.origin[key] != bilingual:  # the same chapter under 双语数据/ and outside it
            reason = f"the same chapter is also under {BILINGUAL_DIR}/ (that copy is used)"
            if not bilingual:
                self.not_used(rel, reason)
                return
            for old_rel, _, _ in self.files_of[key].values():
                self.not_used(old_rel, reason)
            self.files_of[key] = {}
            self.chapters.pop(key, None)
            self.done.discard(key)
        self.origin[key] = bilingual
        chapter_files = self.files_of.setdefault(key, {})
        entry = (rel, None if problem else load(), problem)
        if name in chapter_files:  # a later archive member of the same name replaces the earlier one, as `tar x` does
            self.not_used(chapter_files[name][0], "replaced by a later archive member of the same name (as tar x)")
            chapter_files[name] = entry
            if key in self.done:  # read again once the walk is over (its partner may be replaced later too: a newer
                self.chapters.pop(key, None)  # source.txt, then a newer target.txt, must not pair new with old)
                self.done.discard(key)
            return
        chapter_files[name] = entry
        if key in self.done:  # a bitext.txt after its chapter's source.txt + target.txt
            if not problem:
                self.not_used(rel, "bitext.txt beside source.txt + target.txt (those are used)")
            return
        if self.finish(key, chapter_files, final=False):
            self.done.add(key)
            if self.path.is_dir():  # no member can come again: the bytes are not kept
                self.files_of[key] = {n: (r, None, pr) for n, (r, _, pr) in chapter_files.items()}

    def finish(self, key: tuple[str, str], files: dict, final: bool) -> bool:
        """Turn one chapter's files into pairs; False while its other file may still come."""
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
                self.skip(rel, problem)
        bad = [(name, files[name]) for name in used if files[name][2]]
        if bad:  # count every file of the pair: the chapter is not read
            for name in used:
                rel, _, problem = files[name]
                self.skip(rel, problem or f"partner skipped: {bad[0][0]} beside it is {bad[0][1][2].split(':')[0]}")
            return True
        if used == ["source.txt", "target.txt"] and "bitext.txt" in files and not files["bitext.txt"][2]:
            self.not_used(files["bitext.txt"][0], "bitext.txt beside source.txt + target.txt (those are used)")
        if used == ["source.txt", "target.txt"]:
            pairs = self.read_pair(files["source.txt"], files["target.txt"])
        elif used == ["bitext.txt"]:
            pairs = self.read_bitext(files["bitext.txt"])
        else:
            pairs = self.lone_file(files)
        if pairs is not None:
            self.add_chapter(key, *pairs)
        return True

    def read_pair(self, source: tuple, target: tuple) -> tuple[list[str], list[str]] | None:
        """source.txt + target.txt, line by line; None (counted) where one is empty or they are misaligned."""
        s_where, t_where = self.where(source[0]), self.where(target[0])
        src = archives.split_lines(archives.decode(source[1], s_where, self.encoding))
        tgt = archives.split_lines(archives.decode(target[1], t_where, self.encoding))
        self.stats["files_read"] += 2
        if not src or not tgt:
            for w, lines in ((s_where, src), (t_where, tgt)):
                if not lines:
                    skip(self.stats, w, "empty file")
            return None
        if len(src) != len(tgt):
            message = f"misaligned: {len(src):,} lines in {s_where} but {len(tgt):,} in {t_where}"
            if self.on_misaligned == "error":
                raise PipelineError(f"{message}; fix the files or set ingest.on_misaligned: skip")
            skip(self.stats, s_where, message)
            return None
        return src, tgt

    def read_bitext(self, bitext: tuple) -> tuple[list[str], list[str]] | None:
        """bitext.txt's 古文/现代文 pairs; None (counted) where it holds none."""
        b_where = self.where(bitext[0])
        text = archives.decode(bitext[1], b_where, self.encoding)
        self.stats["files_read"] += 1
        src, tgt = parse_bitext(text, b_where)
        if not src:
            skip(self.stats, b_where, "empty file")
            return None
        return src, tgt

    def lone_file(self, files: dict) -> None:
        """A source.txt or target.txt whose partner never came (nor a bitext.txt): an error, or counted."""
        name, (rel, _, _) = next(iter(files.items()))
        other = "target.txt" if name == "source.txt" else "source.txt"
        message = f"misaligned: {self.where(rel)} has no {other} beside it (nor a bitext.txt)"
        if self.on_misaligned == "error":
            raise PipelineError(f"{message}; add it or set ingest.on_misaligned: skip")
        self.skip(rel, message)

    def add_chapter(self, key: tuple[str, str], src: list[str], tgt: list[str]) -> None:
        """A chapter's pairs, numbered by line, without the pairs blank on both sides (counted)."""
        lines = list(range(1, len(src) + 1))
        keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if s.strip() or t.strip()]
        if len(keep) != len(src):
            self.stats["blank_lines_skipped"] += len(src) - len(keep)
            src, tgt, lines = [src[i] for i in keep], [tgt[i] for i in keep], [lines[i] for i in keep]
        self.chapters[key] = (*key, lines, src, tgt)

    def check_books(self) -> None:
        """The layout was found, and every book the filter names is there."""
        if not self.available and not self.unreadable:
            raise PipelineError(
                f"{self.path}: no source.txt/target.txt or bitext.txt found; expected the NiuTrans layout "
                f"[{BILINGUAL_DIR}/]<book>/.../<chapter>/source.txt + target.txt"
            )
        missing = sorted(self.wanted - self.available)
        if missing:
            why = "; ".join(f"{b} was skipped ({self.unreadable[b]})" for b in missing if b in self.unreadable)
            raise PipelineError(
                f"{self.path}: book(s) {', '.join(missing)} not found (ingest.sources books filter)"
                + (f"; {why}" if why else "")
                + f"; available books: {', '.join(sorted(self.available)) or 'none'}"
            )


def check_depth(root: Path, limit: int = MAX_DEPTH) -> None:
    """A directory source no deeper than limit levels, walked iteratively (a stack, links not followed): a
    thousand-level tree is one error naming where it goes too deep, never a RecursionError or a name too long."""
    stack = [(os.fspath(root), 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            with os.scandir(directory) as entries:
                subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue  # unreadable: the reader reports it, counted in the report
        if subdirs and depth + 1 > limit:
            shown = os.path.relpath(subdirs[0], root)
            shown = shown if len(shown) <= 120 else f"{shown[:60]}…{shown[-40:]}"
            raise PipelineError(f"{root}: directories nest more than {limit} levels deep ({shown}); a corpus in the "
                                f"NiuTrans layout has a few, so this is not one: give the corpus directory itself")
        stack.extend((d, depth + 1) for d in subdirs)


def read_niutrans(path: Path, corpus: str, encoding: str, books: list[str], on_misaligned: str, stats: dict):
    """Return [(book, chapter, lines, sources, targets)] sorted by (book, chapter path) for one source.

    A chapter whose source.txt or target.txt cannot be read (a link outside the corpus, a FIFO, a
    directory, too large: see wenyan.archives.iter_files) is skipped: both its files are counted in the report."""
    return NiutransReader(path, corpus, encoding, books, on_misaligned, stats).read()


# ----------------------------------------------------------------------------------------------
# TSV and JSONL: one pair a line


def _chunk_chapter(line: int) -> str:
    start = (line - 1) // CHUNK_LINES * CHUNK_LINES + 1
    return f"lines-{start}-{start + CHUNK_LINES - 1}"


def parse_tsv(text: str, where: str, default_book: str, stats: dict | None = None) -> list[tuple[str, str | None, int, str, str]]:
    """-> [(book, chapter or None, line, source, target)].

    Rules (nothing dropped silently): a header line names the columns (source, target, book, chapter); the same
    header again further down (`cat a.tsv b.tsv`) is not a pair: skipped and counted (not_used_by_reason
    "repeated header line"). Without a header a file has exactly two columns, source and target: a file whose
    first line has 3 or 4 is one error asking for a header, since a tab inside a sentence would otherwise be
    taken for a column boundary (the rest of a target read as a book name). A line with another number of
    columns than the header's is one error naming it."""
    rows = []
    columns = None
    not_used = stats["not_used_by_reason"] if stats is not None else collections.Counter()
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        names = [f.strip().lower() for f in fields]
        is_header = "source" in names and "target" in names and set(names) <= {"source", "target", "book", "chapter"}
        if columns is None:
            if "source" in names and "target" in names:
                unknown = set(names) - {"source", "target", "book", "chapter"}
                if unknown or len(set(names)) != len(names):
                    raise PipelineError(
                        f"{where}:{lineno}: header columns should be source, target and optionally book, "
                        f"chapter (each once); got {', '.join(names)}"
                    )
                columns = names
                continue
            if len(fields) != 2:
                raise PipelineError(
                    f"{where}:{lineno}: {len(fields)} tab-separated columns and no header line; a file without a header "
                    f"has two (source, target). Add a header line naming the columns (source<TAB>target<TAB>book...), "
                    f"or if a sentence holds a tab, replace it"
                )
            columns = ["source", "target"]
        elif is_header:
            if names != columns:
                raise PipelineError(f"{where}:{lineno}: a header line naming other columns ({', '.join(names)}) than the "
                                    f"first one ({', '.join(columns)}); join files with the same columns")
            not_used["repeated header line"] += 1
            log.warning("%s:%d: the header line again (files joined with cat?): not a pair, skipped", where, lineno)
            continue
        if len(fields) != len(columns):
            raise PipelineError(
                f"{where}:{lineno}: expected {len(columns)} tab-separated columns ({', '.join(columns)}), "
                f"got {len(fields)}" + ("; a tab inside a sentence? replace it" if len(fields) > len(columns) else "")
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


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(json.dumps(key, ensure_ascii=False))
        seen[key] = value
    return seen


def parse_jsonl(text: str, where: str, default_book: str) -> list[tuple[str, str | None, int, str, str]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{where}:{lineno}: not valid JSON ({exc.msg})") from None
        except _DuplicateKey as exc:  # json.loads would keep the last value silently
            raise PipelineError(f"{where}:{lineno}: the key {exc} is given twice in one object; JSON readers keep the "
                                f"last one silently: keep one") from None
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
    text = archives.read_text_file(path, encoding, what=f"a {fmt} source")
    stats["files_read"] += 1
    rows = parse_tsv(text, str(path), corpus, stats) if fmt == "tsv" else parse_jsonl(text, str(path), corpus)
    if not rows:
        skip(stats, str(path), "empty file")
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
