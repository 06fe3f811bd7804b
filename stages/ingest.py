"""Ingest: read the parallel corpora listed in params.yaml `ingest.sources` into one table of pairs.

Inputs:  each source's `path`, in one of three formats:
           niutrans  the NiuTrans Classical-Modern layout, as a directory or straight from a .tar,
                     .tar.gz, .tar.xz or .zip of it (streamed, never unpacked to disk):
                       [双语数据/]<book>/<part>/.../<chapter>/source.txt + target.txt (line-aligned),
                       or bitext.txt (`古文：…` / `现代文：…` lines, pairs separated by blank lines)
                       where a chapter has no source.txt/target.txt
           tsv       source<TAB>target, or with a header line naming the columns source, target[, book[, chapter]]
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

What is read but not used is counted by reason in the report (not_used_by_reason, with examples), by the
rules of wenyan/corpora.py (its docstring lists them: archive members given twice, 双语数据/ copies, wrapper
folders, files that are not chapter files, tsv headers and columns, jsonl keys given twice, links and odd files).
Nothing is dropped silently; nothing outside the corpus root is read; a damaged archive is one `error:` line.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from wenyan import archives
from wenyan.corpora import corpus_name, read_lines_file, read_niutrans
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.files import PAIR_COLUMNS, atomic_outputs, check_paths, with_path_errors, write_json
from wenyan.params import add_params_options, check_entry, named_entries, check_params, load_params, Param, Str

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


# ----------------------------------------------------------------------------------------------
# Parameters and the table


def check_sources(params: dict) -> list[dict]:
    """Validate every ingest.sources entry before reading anything."""
    if params["on_misaligned"] not in ("error", "skip"):
        raise PipelineError(f"params.yaml 'ingest.on_misaligned' should be error or skip, got {params['on_misaligned']!r}")
    sources = []
    for where, entry in named_entries(params["sources"], "ingest.sources"):
        src = check_entry(entry, SOURCE_DEFAULTS, where)
        if not src["path"]:
            raise PipelineError(f"params.yaml '{where}' has no path")
        if src["format"] not in FORMATS:
            raise PipelineError(
                f"params.yaml '{where}.format' should be one of {', '.join(FORMATS)}, got {src['format']!r}"
            )
        archives.check_encoding(src["encoding"], where, src["path"])
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


def new_stats() -> dict:
    return {"files_read": 0, "files_skipped": 0, "skipped_by_reason": collections.Counter(), "skipped_files": [],
            "blank_lines_skipped": 0,
            "not_used_by_reason": collections.Counter(),  # what was read but not used, and why (documented rules)
            "not_used_examples": []}


def read_source(src: dict, on_misaligned: str, columns: dict) -> dict:
    """One ingest.sources entry's pairs appended to the output columns; returns its entry of the report."""
    stats = new_stats()
    path = Path(src["path"])
    if src["format"] == "niutrans":
        chapters = read_niutrans(path, src["name"], src["encoding"], src["books"], on_misaligned, stats)
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
    return {
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
        "not_used_by_reason": dict(sorted(stats["not_used_by_reason"].items())),
        "not_used_examples": stats["not_used_examples"],
        "pairs_per_book": dict(sorted(per_book.items())),
    }


def check_ids(ids: list[str]) -> None:
    """Some pairs at all, and every id once (two sources with one corpus name would collide)."""
    if not ids:
        raise PipelineError("ingest read no pairs at all; check ingest.sources in params.yaml (see reports above)")
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        raise PipelineError(
            f"{len(dups):,} duplicate pair ids (e.g. {dups[0]}): two sources share a corpus name; "
            f"give one a distinct `name:` in ingest.sources"
        )


def pairs_table(columns: dict):
    """The output columns as a pyarrow table with the schema of the module docstring."""
    import pyarrow as pa

    types = {"line": pa.int64()}
    return pa.table({name: pa.array(columns[name], types.get(name, pa.string())) for name in PAIR_COLUMNS})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="pairs parquet to write")
    parser.add_argument("--report", required=True, help="JSON report to write")
    add_params_options(parser)
    args = parser.parse_args(argv)

    params = check_params(load_params("ingest", args.params), SCHEMA, "ingest")
    sources = check_sources(params)
    if args.check_params:
        return

    check_paths({**{f"ingest.sources[{i}].path": s["path"] for i, s in enumerate(sources)}, "--params": args.params},
                {"--out": args.out, "--report": args.report},
                dirs=[f"ingest.sources[{i}].path" for i, s in enumerate(sources) if s["format"] == "niutrans"])
    import pyarrow.parquet as pq

    columns: dict[str, list] = {k: [] for k in PAIR_COLUMNS}
    report_sources = [read_source(src, params["on_misaligned"], columns) for src in sources]
    check_ids(columns["id"])
    table = pairs_table(columns)
    per_book_all = collections.Counter()
    for s in report_sources:
        for book, n in s["pairs_per_book"].items():
            per_book_all[f"{s['corpus']}/{book}"] += n
    report = {
        "pairs": len(columns["id"]),
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
    log.info("wrote %s pairs to %s", f"{len(columns['id']):,}", args.out)


if __name__ == "__main__":
    run_main(with_path_errors(main))
