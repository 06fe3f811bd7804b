"""Monolingual text for pretraining (the pretrain stage): reading sources with the archive rules of ingest
(wenyan/archives.py's iter_files, the reader ingest's NiutransReader uses: the same size limits a file and an
archive, the same bomb checks, links and damage; a member name given twice: the later one is read, as `tar x` and
ingest do, the earlier counted in not_used_by_reason), HTML tags stripped, lines normalised as the clean stage does,
every valid/test sentence removed (split's leakage key, wenyan.text.leakage_key), documents tokenized and packed into
full-length sequences. The stage's docstring (stages/pretrain.py) states the rules."""

from __future__ import annotations

import collections
import json
import os

import re
from pathlib import Path

from wenyan import archives, text
from wenyan.errors import PipelineError, get_logger


log = get_logger("pretrain")

SOURCE_DEFAULTS = {"path": "", "format": "niutrans", "books": [], "encoding": "utf-8", "field": "text"}
FORMATS = ("niutrans", "text", "jsonl")
MONO_DIR = "古文原文"  # the NiuTrans monolingual top folder: 古文原文/<book>/.../<chapter>/text.txt
CHAPTER_FILE = "text.txt"
MAX_LISTED_SKIPS = 200  # skipped files listed in data.json; the counts are always complete
NORMALISE_CHARS = 1 << 20  # lines are normalised in blocks of ~1M characters (one regex/OpenCC pass a block)

_TAG = re.compile(r"</?[A-Za-z][^<>\n]{0,300}>")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
# a sentence ends after a run of 。！？； (and ! ? ;) and the closing quotes/brackets right after it
_SENTENCE = re.compile(r"[^。！？；!?;]*[。！？；!?;]+[”’」』）)》]*|[^。！？；!?;]+$")





# ----------------------------------------------------------------------------------------------
# Reading: [(name, lines)] documents, and what was skipped


class Stats:
    """What reading found, per source: files read, skipped by reason, documents, lines."""

    def __init__(self):
        self.files_read = 0
        self.files_skipped = 0
        self.skipped_by_reason = collections.Counter()
        self.skipped_files: list[dict] = []
        self.files_ignored = 0  # other files of the layout (数据来源.txt, README): not text to read
        self.documents = 0
        self.lines = 0
        self.html_tags_removed = 0
        self.not_used_by_reason = collections.Counter()  # read but not used, by rule (as ingest's report)
        self.not_used_examples: list[dict] = []

    def skip(self, file: str, reason: str) -> None:
        self.files_skipped += 1
        self.skipped_by_reason[reason.split(":")[0]] += 1
        if len(self.skipped_files) < MAX_LISTED_SKIPS:
            self.skipped_files.append({"file": file, "reason": reason})
        # an empty chapter is common in the corpus (本草纲目 has dozens): counted, listed, not one warning each
        (log.debug if reason == "empty file" else log.warning)("skipped %s: %s", file, reason)

    def not_used(self, file: str, reason: str) -> None:
        """A file read but not used, by a documented rule (archives.REPLACED): counted, the first ones listed."""
        self.not_used_by_reason[reason] += 1
        if len(self.not_used_examples) < MAX_LISTED_SKIPS:
            self.not_used_examples.append({"file": file, "reason": reason})
        log.warning("not used: %s: %s", file, reason)

    def report(self) -> dict:
        return {"files_read": self.files_read, "files_skipped": self.files_skipped,
                "skipped_by_reason": dict(self.skipped_by_reason), "skipped_files": self.skipped_files,
                "files_ignored": self.files_ignored, "documents": self.documents, "lines": self.lines,
                "html_tags_removed": self.html_tags_removed, "not_used_by_reason": dict(self.not_used_by_reason),
                "not_used_examples": self.not_used_examples}


def strip_tags(lines: list[str], stats: Stats) -> list[str]:
    """<br/> -> a line break, other HTML tags removed (counted)."""
    out = []
    for line in lines:
        if "<" in line:
            line, n_br = _BR.subn("\n", line)
            line, n_tag = _TAG.subn("", line)
            stats.html_tags_removed += n_br + n_tag
            out.extend(line.split("\n"))
        else:
            out.append(line)
    return out


def decode(data: bytes, where: str, encoding: str) -> str:
    """archives.decode (BOM, CRLF; a bad byte is an error naming the file and line), its hint naming pretrain.sources."""
    try:
        return archives.decode(data, where, encoding)
    except PipelineError as exc:
        raise PipelineError(str(exc).replace("ingest.sources", "pretrain.sources")) from None


def text_lines(data: bytes, where: str, encoding: str, stats: Stats) -> list[str]:
    return strip_tags(archives.split_lines(decode(data, where, encoding)), stats)


def blocks(lines: list[str]) -> list[list[str]]:
    """Documents of a plain text file: runs of lines separated by blank lines."""
    docs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs


# Long (~85 lines): one walk of a directory or archive with the layout's rules (book filter, chapter files, skips).
def read_tree(path: Path, fmt: str, encoding: str, books: list[str], stats: Stats):
    """Documents [(name, lines)] of a directory or archive: niutrans text.txt chapters, or every *.txt (text). An
    archive member given twice: the later one's documents replace the earlier's (archives.REPLACED, counted)."""
    wanted, found = set(books), set()
    unreadable: dict[str, str] = {}
    is_dir = path.is_dir()

    def where(rel: str) -> str:
        return f"{path}/{rel}" if is_dir else f"{path}:{rel}"

    def book_parts(rel: str) -> list[str] | None:
        """[book, ..., chapter, file] below 古文原文/, or below the top folder (a directory of books, an
        archive holding one folder of books); None for a file at the top."""
        parts = rel.split("/")
        if MONO_DIR in parts[:-1]:
            return parts[parts.index(MONO_DIR) + 1 :]
        if not is_dir and len(parts) > 3:  # mono.tar.xz holding mono/<book>/<chapter>/text.txt
            return parts[1:]
        return parts if len(parts) > 1 else None

    def relevant(rel: str) -> bool:  # which link targets a streamed tar reads in its second pass
        if fmt == "text":
            return rel.lower().endswith(".txt")
        parts = book_parts(rel)
        return bool(parts) and len(parts) >= 2 and parts[-1] == CHAPTER_FILE and (not wanted or parts[0] in wanted)

    of_file: dict[str, list] = {}  # a file's documents; a later member of the same name replaces them

    def put(rel: str, documents: list) -> None:
        if rel in of_file:
            stats.not_used(where(rel), archives.REPLACED)
        of_file[rel] = documents

    # a directory named text.txt is reported, not walked, as ingest reports one named source.txt
    files = archives.iter_files(path, relevant, must_be_files=(CHAPTER_FILE,) if fmt == "niutrans" else ())
    try:
        for rel, load, problem in files:
            if fmt == "text":
                if not rel.lower().endswith(".txt") and not problem:
                    stats.files_ignored += 1
                    continue
                if problem:
                    stats.skip(where(rel), problem)
                    if rel in of_file:  # an unreadable later member still replaces the earlier, as tar x
                        put(rel, [])
                    continue
                lines = text_lines(load(), where(rel), encoding, stats)
                stats.files_read += 1
                parts = blocks(lines)
                if not parts:
                    stats.skip(where(rel), "empty file")
                put(rel, [(f"{rel}#{i + 1}", block) for i, block in enumerate(parts)])
                continue
            parts = book_parts(rel)
            if parts is None or len(parts) < 2 or parts[-1] != CHAPTER_FILE:
                if problem and (parts is None or not wanted or parts[0] in wanted):  # a linked book directory, ...
                    if parts:
                        unreadable.setdefault(parts[0], problem)
                    stats.skip(where(rel), problem)
                elif not problem:
                    stats.files_ignored += 1
                continue
            book = parts[0]
            if wanted and book not in wanted:
                continue
            if problem:
                unreadable.setdefault(book, problem)
                stats.skip(where(rel), problem)
                if rel in of_file:  # an unreadable later member still replaces the earlier, as tar x
                    put(rel, [])
                continue
            found.add(book)
            lines = [line for line in text_lines(load(), where(rel), encoding, stats) if line.strip()]
            stats.files_read += 1
            if not lines:
                stats.skip(where(rel), "empty file")
            put(rel, [("/".join(parts[:-1]), lines)] if lines else [])
    except PipelineError:
        if not is_dir:  # bad text in an archive may be a damaged download: let the archive check itself first
            for _ in files:
                pass
        raise
    if fmt == "niutrans" and not found and not unreadable:
        raise PipelineError(f"{path}: no {CHAPTER_FILE} found; expected the NiuTrans monolingual layout "
                            f"[<top>/][{MONO_DIR}/]<book>/.../<chapter>/{CHAPTER_FILE}")
    missing = sorted(wanted - found)
    if missing:
        why = "; ".join(f"{b} was skipped ({unreadable[b]})" for b in missing if b in unreadable)
        raise PipelineError(f"{path}: book(s) {', '.join(missing)} not found (pretrain.sources books filter)"
                            + (f"; {why}" if why else ""))
    docs = [doc for documents in of_file.values() for doc in documents]
    docs.sort(key=lambda d: d[0].split("/"))
    return docs


def read_single_file(path: Path, fmt: str, encoding: str, field: str, stats: Stats):
    """Documents of a plain text file (blank-line separated) or a JSONL file (`field` of each object)."""
    if not path.is_file():
        raise PipelineError(f"{path}: a {fmt} source must be a regular file, a directory or an archive "
                            f"(it is a {archives.mode_name(path.stat().st_mode)})")
    if archives.size_problem(path.stat().st_size):
        raise PipelineError(f"{path}: {archives.size_problem(path.stat().st_size)}; split it into several sources")
    data = archives.read_regular(os.path.realpath(path))
    stats.files_read += 1
    if fmt == "text":
        docs = [(f"{path.name}#{i + 1}", b) for i, b in enumerate(blocks(text_lines(data, str(path), encoding, stats)))]
    else:
        docs = []
        for lineno, line in enumerate(decode(data, str(path), encoding).split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                what = f"keys {', '.join(obj)}" if isinstance(obj, dict) else type(obj).__name__
                raise PipelineError(f"{path}:{lineno}: expected a JSON object with a '{field}' field (got {what}); "
                                    f"set pretrain.sources field: to the key holding the text")
            value = obj[field]
            if not isinstance(value, str):
                raise PipelineError(f"{path}:{lineno}: '{field}' should be a string, got {type(value).__name__}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise PipelineError(f"{path}:{lineno}: '{field}' holds a lone surrogate escape, which is not text") from None
            lines = [s for s in strip_tags(value.replace("\r\n", "\n").split("\n"), stats) if s.strip()]
            if lines:
                docs.append((f"{path.name}:{lineno}", lines))
    if not docs:
        stats.skip(str(path), "empty file")
    return docs


def read_source(src: dict, stats: Stats):
    path = Path(src["path"])
    if path.is_dir() or (src["format"] != "jsonl" and path.is_file()
                         and archives.archive_kind(path) is not None):
        if src["format"] == "jsonl":
            raise PipelineError(f"{path}: a jsonl source is one file, not a directory")
        return read_tree(path, src["format"], src["encoding"], src["books"], stats)
    if src["format"] == "niutrans":
        list(archives.iter_files(path))  # raises the reader's own error: not a directory or an archive
    return read_single_file(path, src["format"], src["encoding"], src["field"], stats)


# ----------------------------------------------------------------------------------------------
# Normalisation and the valid/test overlap


def normalise_documents(docs: list[tuple[str, list[str]]], converter, counts: dict) -> list[tuple[str, list[str]]]:
    """Every document's lines through text.normalise_lines (clean's steps 1-5), in blocks of ~1M characters;
    lines left empty are dropped, documents left empty too."""
    out, pending, size = [], [], 0

    def flush():
        nonlocal pending, size
        flat = [line for _, lines in pending for line in lines]
        normal = iter(text.normalise_lines(flat, converter, counts))
        for name, lines in pending:
            kept = [s for s in (next(normal) for _ in lines) if s.strip()]
            if kept:
                out.append((name, kept))
        pending, size = [], 0

    for doc in docs:
        pending.append(doc)
        size += sum(len(s) for s in doc[1])
        if size >= NORMALISE_CHARS:
            flush()
    flush()
    return out


def sentences(line: str) -> list[str]:
    return _SENTENCE.findall(line)


def held_out_keys(frames) -> set[str]:
    """Keys of every valid/test line and sentence, both sides."""
    keys = set()
    for df in frames:
        for column in ("source", "target"):
            for line in df[column].tolist():
                keys.add(text.leakage_key(line))
                keys.update(text.leakage_key(s) for s in sentences(line))
    keys.discard("")
    return keys


def remove_overlap(docs, keys: set[str], counts: collections.Counter):
    """Cut out every sentence whose key is a valid/test key; lines and documents left empty are dropped."""
    out = []
    for name, lines in docs:
        kept_lines = []
        for line in lines:
            parts = sentences(line)
            keep = [s for s, key in zip(parts, map(text.leakage_key, parts)) if not key or key not in keys]
            counts["sentences"] += len(parts)
            if len(keep) != len(parts):
                counts["sentences_removed"] += len(parts) - len(keep)
                counts["characters_removed"] += sum(map(len, parts)) - sum(map(len, keep))
                line = "".join(keep)
                if not line.strip():
                    counts["lines_removed"] += 1
                    continue
            kept_lines.append(line)
        if kept_lines:
            out.append((name, kept_lines))
        else:
            counts["documents_removed"] += 1
    return out


def train_split_documents(train_df) -> list[tuple[str, list[str]]]:
    """The train split's sources and targets: one document a chapter and side, in file order."""
    docs = []
    chapters = (train_df["corpus"] + "/" + train_df["book"] + "/" + train_df["chapter"]).tolist()
    groups: dict[str, list[int]] = {}
    for i, chapter in enumerate(chapters):
        groups.setdefault(chapter, []).append(i)
    sources, targets = train_df["source"].tolist(), train_df["target"].tolist()
    for chapter, rows in groups.items():
        for side, column in (("source", sources), ("target", targets)):
            lines = [column[i] for i in rows if column[i].strip()]
            if lines:
                docs.append((f"train:{chapter}:{side}", lines))
    return docs


# ----------------------------------------------------------------------------------------------
# Packing


def pack(token_lists, eos_id: int, length: int):
    """Documents' token ids joined with eos_id (after every document) and cut into rows of exactly `length`
    tokens: (int32 array [rows, length], tokens in the stream, tail tokens dropped)."""
    import numpy as np

    total = sum(len(ids) + 1 for ids in token_lists)
    stream = np.empty(total, dtype=np.int32)
    at = 0
    for ids in token_lists:
        stream[at : at + len(ids)] = ids
        stream[at + len(ids)] = eos_id
        at += len(ids) + 1
    rows = total // length
    return stream[: rows * length].reshape(rows, length), total, total - rows * length


def tokenize_documents(tokenizer, docs, batch: int = 256) -> list:
    """Each document (its lines joined with newlines) tokenized alone, without special tokens, as an int32
    array (51M tokens as Python ints would take ~2 GB); text that looks like a special token (<|im_end|>) is
    split as text, never read as the token."""
    import numpy as np
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=len(docs), desc="tokenize", unit="doc", disable=None) as bar:
        for i in range(0, len(docs), batch):
            texts = ["\n".join(lines) for _, lines in docs[i : i + batch]]
            ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True).input_ids
            out.extend(np.asarray(row, dtype=np.int32) for row in ids)
            bar.update(len(texts))
    return out
