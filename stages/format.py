"""Format: turn each split's pairs into chat conversations for fine-tuning and evaluation.

Inputs:  data/split/{train,valid,test}.parquet (schema in stages/ingest.py)
Outputs: data/format/{train,valid,test}.jsonl, one object a line:
           {"id", "book", "chapter", "line", "source", "target",
            "messages": [{"role": "system", "content": system_prompt}      (only if system_prompt is set)
                         {"role": "user", "content": [context_template] + user_template},
                         {"role": "assistant", "content": target}],
            "unseen_book": true/false}                                      (test.jsonl only)
         train fine-tunes on messages; evaluate prompts with messages[:-1] and scores against `target`.
         unseen_book: the row's book has no row in train or valid (a book of split.test_books, or one whose
         chapters all drew test); evaluate scores those rows apart from the chapter test. A book is its name,
         whatever its corpus, as in split.test_books.
         reports/data/format.json: rows per split, mean prompt length, with-context counts, the test rows of
         unseen books, an example.
Run:     python -m stages.format --split-dir data/split --out data/format --report reports/data/format.json
         (what `dvc repro format` runs; tests add --params FILE)

With context_sentences N > 0 the user message starts with context_template.format(context=...), the N
classical sentences just before this one in the same chapter and the same split (in line order, joined
without a separator, as Chinese text is), when there are any.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from wenyan.prompt import build_messages, check_templates, join_templates, PROMPT_SCHEMA
from wenyan.errors import get_logger, run_main
from wenyan.files import atomic_outputs, check_paths, read_pairs, write_json, write_jsonl
from wenyan.params import add_params_options, check_params, load_params

log = get_logger("format")

SCHEMA = PROMPT_SCHEMA  # wenyan.prompt's: train records these values with the model
SPLITS = ("train", "valid", "test")


def seen_books(frames: dict) -> set[str]:
    """The books with a row in train or valid: the model saw them (test rows of other books are unseen)."""
    return {book for s in ("train", "valid") for book in frames[s]["book"].tolist()}


def format_rows(df, params: dict, stats: dict | None = None, seen: set[str] | None = None):
    """Yield one JSONL object per row of df, in (corpus, book, chapter, line) order; stats gets sums. With seen
    (the test split) each row gets unseen_book: its book is not in seen."""
    stats = {} if stats is None else stats
    for key in ("prompt_chars", "user_chars", "target_chars", "with_context", "unseen_book"):
        stats.setdefault(key, 0)
    n = params["context_sentences"]
    df = df.sort_values(["corpus", "book", "chapter", "line"], kind="stable")
    previous: collections.deque = collections.deque(maxlen=max(n, 1))
    last_chapter = None
    for id_, corpus, book, chapter, line, source, target in zip(
        *(df[c].tolist() for c in ("id", "corpus", "book", "chapter", "line", "source", "target"))
    ):
        if n:
            if (corpus, book, chapter) != last_chapter:
                previous.clear()
                last_chapter = (corpus, book, chapter)
            context = list(previous)
            previous.append(source)
        else:
            context = []
        messages = build_messages(source, target, context, params)
        stats["prompt_chars"] += sum(len(m["content"]) for m in messages[:-1])
        stats["user_chars"] += len(messages[-2]["content"])
        stats["target_chars"] += len(target)
        stats["with_context"] += bool(context)
        row = {"id": id_, "book": book, "chapter": chapter, "line": line, "source": source, "target": target, "messages": messages}
        if seen is not None:
            row["unseen_book"] = book not in seen
            stats["unseen_book"] += row["unseen_book"]
        if "example" not in stats and (context or not n):
            stats["example"] = row  # the first row, or with context_sentences the first that has context
        yield row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split-dir", required=True, help="directory with train/valid/test.parquet")
    parser.add_argument("--out", required=True, help="directory for train/valid/test.jsonl")
    parser.add_argument("--report", required=True, help="JSON report to write")
    add_params_options(parser)
    args = parser.parse_args(argv)
    check_paths({**{f"--split-dir {s}.parquet": Path(args.split_dir) / f"{s}.parquet" for s in SPLITS}, "--params": args.params},
                {**{f"--out {s}.jsonl": Path(args.out) / f"{s}.jsonl" for s in SPLITS}, "--report": args.report})

    params = join_templates(check_params(load_params("format", args.params), SCHEMA, "format"))
    check_templates(params)
    if args.check_params:
        return
    from tqdm import tqdm

    frames = {s: read_pairs(Path(args.split_dir) / f"{s}.parquet", "split") for s in SPLITS}
    report = {}
    example = None
    seen = seen_books(frames)
    outputs = [Path(args.out) / f"{s}.jsonl" for s in SPLITS] + [args.report]
    with atomic_outputs(*outputs) as (*split_tmps, report_tmp):  # all change together, or none
        for s, tmp in zip(SPLITS, split_tmps):
            stats: dict = {}
            rows = format_rows(frames[s], params, stats, seen if s == "test" else None)
            rows = tqdm(rows, total=len(frames[s]), desc=f"format {s}", unit="row", disable=None)
            n = write_jsonl(tmp, rows)
            example = example or stats.get("example")
            report[s] = {
                "rows": n,
                "mean_prompt_chars": round(stats["prompt_chars"] / n, 2) if n else 0,
                "mean_user_chars": round(stats["user_chars"] / n, 2) if n else 0,
                "mean_target_chars": round(stats["target_chars"] / n, 2) if n else 0,
                "with_context": stats["with_context"],
            }
            if s == "test":
                report[s]["unseen_book_rows"] = stats["unseen_book"]
            log.info(
                "%s: %s rows, mean prompt %s chars (system + user), %s with context%s",
                s, f"{n:,}", report[s]["mean_prompt_chars"], f"{stats['with_context']:,}",
                f", {stats['unseen_book']:,} of unseen books" if s == "test" else "",
            )
        write_json(
            report_tmp,
            {
                "rows": {s: r["rows"] for s, r in report.items()},
                "splits": report,
                "params": params,
                "example": example,
            },
        )

if __name__ == "__main__":
    run_main(main)
