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
"""

from __future__ import annotations

import argparse
import codecs
import collections
import json
import lzma
import os
import tarfile
import zipfile
import zlib
from pathlib import Path

from stages.common import ListOf, PipelineError, Str, atomic_outputs, check_entry, check_params, get_logger, load_params, run_main, write_json

log = get_logger("ingest")

SCHEMA = {"sources": ListOf(dict), "on_misaligned": Str("error", "skip")}  # values and comments: params.yaml
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


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if any(name.endswith(s) for s in ARCHIVE_SUFFIXES):
        return "tar"
    return None


def _zip_name(info: zipfile.ZipInfo) -> str:
    """Member name; zips made on Chinese Windows store GBK names without the UTF-8 flag."""
    if info.flag_bits & 0x800:
        return info.filename
    raw = info.filename.encode("cp437", errors="replace")
    for enc in ("utf-8", "gbk"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            pass
    return info.filename


def iter_files(path: Path, show_progress: bool = True):
    """Yield (relative path with '/', load) for every file of a directory or archive, in stored order.

    `load()` returns the bytes; for a streamed tar it must be called before the next item (or never).
    """
    from tqdm import tqdm

    kind = _archive_kind(path) if path.is_file() else "dir"
    if kind == "dir":
        with tqdm(desc=f"read {path}", unit="file", disable=None if show_progress else True) as bar:
            for root, dirs, files in os.walk(path):
                dirs.sort()
                rel = Path(root).relative_to(path).as_posix()
                for name in sorted(files):
                    bar.update()
                    yield (name if rel == "." else f"{rel}/{name}"), (Path(root) / name).read_bytes
        return
    if kind is None:
        raise PipelineError(
            f"{path}: a niutrans source must be a directory or an archive ({', '.join(ARCHIVE_SUFFIXES)})"
        )
    corrupt = (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError, zlib.error, OSError)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                for info in tqdm(zf.infolist(), desc=f"read {path.name}", unit="file", disable=None if show_progress else True):
                    if not info.is_dir():
                        yield _zip_name(info), (lambda info=info: zf.read(info))
        else:
            size = path.stat().st_size
            with open(path, "rb") as raw, tqdm(
                total=size, desc=f"read {path.name}", unit="B", unit_scale=True, disable=None if show_progress else True
            ) as bar:
                with tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|*") as tar:
                    for member in tar:
                        if member.isfile():
                            name = member.name[2:] if member.name.startswith("./") else member.name
                            yield name, (lambda member=member: tar.extractfile(member).read())
                    # A cut in the tar's zero padding loses no member but is still a broken download:
                    # read to the end and check that the compressed stream really ended.
                    stream = tar.fileobj
                    while stream.read(1 << 20):
                        pass
                    decompressor = getattr(stream, "cmp", None)
                    if decompressor is not None and not getattr(decompressor, "eof", True):
                        raise EOFError("the compressed stream ends before its end marker")
    except corrupt as exc:
        raise PipelineError(f"{path}: corrupt or truncated archive ({type(exc).__name__}: {exc})") from None


class _CountingReader:
    """File wrapper that advances a tqdm bar by the compressed bytes read."""

    def __init__(self, raw, bar):
        self.raw, self.bar = raw, bar

    def read(self, n=-1):
        data = self.raw.read(n)
        self.bar.update(len(data))
        return data


def read_niutrans(path: Path, corpus: str, encoding: str, books: list[str], on_misaligned: str, stats: dict):
    """Return [(book, chapter, lines, sources, targets)] sorted by (book, chapter path) for one source."""
    wanted = set(books)
    available: set[str] = set()
    pending: dict[tuple[str, str], dict[str, tuple[str, bytes]]] = {}  # chapter -> {file name: (path, bytes)}
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

    def finish(key, files, final) -> bool:
        """Turn one chapter's files into pairs; False while its other file may still come."""
        book, chapter = key
        if "source.txt" in files and "target.txt" in files:
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
        elif not final:
            return False  # wait for the other file of the pair
        elif "bitext.txt" in files:
            b_where = where(files["bitext.txt"][0])
            text = decode(files["bitext.txt"][1], b_where, encoding)
            stats["files_read"] += 1
            src, tgt = parse_bitext(text, b_where)
            if not src:
                skip(b_where, "empty file")
                return True
            lines = list(range(1, len(src) + 1))
        else:
            name, (rel, _) = next(iter(files.items()))
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

    for rel, load in iter_files(path):
        parts = rel.split("/")
        if BILINGUAL_DIR in parts[:-1]:
            parts = parts[parts.index(BILINGUAL_DIR) + 1 :]
        elif len(parts) > 2 and parts[0] == corpus and not path.is_dir():
            parts = parts[1:]  # classical-modern.zip holding classical-modern/<book>/...
        if parts[-1] not in PAIR_FILES or len(parts) < 2:
            continue
        book, chapter = parts[0], "/".join(parts[1:-1])
        available.add(book)
        if wanted and book not in wanted:
            continue
        key = (book, chapter)
        if key in done:
            continue  # a bitext.txt beside source.txt + target.txt already read
        pending.setdefault(key, {})[parts[-1]] = (rel, load())
        if finish(key, pending[key], final=False):
            del pending[key]
            done.add(key)
    for key in sorted(pending):
        finish(key, pending.pop(key), final=True)

    if not available:
        raise PipelineError(
            f"{path}: no source.txt/target.txt or bitext.txt found; expected the NiuTrans layout "
            f"[{BILINGUAL_DIR}/]<book>/.../<chapter>/source.txt + target.txt"
        )
    missing = sorted(wanted - available)
    if missing:
        raise PipelineError(
            f"{path}: book(s) {', '.join(missing)} not found (ingest.sources books filter); "
            f"available books: {', '.join(sorted(available))}"
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
                raise PipelineError(f"{where}:{lineno}: no '{key}' field (has {', '.join(obj) or 'none'})")
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise PipelineError(f"{where}:{lineno}: '{key}' should be a string, got {type(obj[key]).__name__}")
        rows.append((obj.get("book") or default_book, obj.get("chapter") or None, lineno, obj["source"], obj["target"]))
    return rows


def read_lines_file(path: Path, fmt: str, corpus: str, encoding: str, books: list[str], stats: dict):
    """A .tsv or .jsonl source -> chapters like read_niutrans."""
    if not path.is_file():
        raise PipelineError(f"{path}: a {fmt} source must be a file")
    text = decode(path.read_bytes(), str(path), encoding)
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


def check_sources(params: dict) -> list[dict]:
    """Validate every ingest.sources entry before reading anything."""
    if params["on_misaligned"] not in ("error", "skip"):
        raise PipelineError(f"params.yaml 'ingest.on_misaligned' should be error or skip, got {params['on_misaligned']!r}")
    if not isinstance(params["sources"], list) or not params["sources"]:
        raise PipelineError("params.yaml 'ingest.sources' should be a non-empty list of {path, format, ...}")
    sources = []
    for i, entry in enumerate(params["sources"]):
        src = check_entry(entry, SOURCE_DEFAULTS, f"ingest.sources[{i}]")
        if not src["path"]:
            raise PipelineError(f"params.yaml 'ingest.sources[{i}]' has no path")
        if src["format"] not in FORMATS:
            raise PipelineError(
                f"params.yaml 'ingest.sources[{i}].format' should be one of {', '.join(FORMATS)}, got {src['format']!r}"
            )
        try:
            codecs.lookup(src["encoding"])
        except LookupError:
            raise PipelineError(f"params.yaml 'ingest.sources[{i}].encoding': unknown encoding {src['encoding']!r}") from None
        if not all(isinstance(b, str) for b in src["books"]):
            raise PipelineError(f"params.yaml 'ingest.sources[{i}].books' should be a list of book names")
        if not Path(src["path"]).exists():
            raise PipelineError(f"{src['path']}: not found (params.yaml ingest.sources[{i}].path)")
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
    args = parser.parse_args(argv)

    params = check_params(load_params("ingest", args.params), SCHEMA, "ingest")
    sources = check_sources(params)

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
