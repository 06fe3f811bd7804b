"""Split: assign whole chapters to train / valid / test, then drop from train and valid every pair whose
classical sentence also appears in test.

Inputs:  data/clean/pairs.parquet (schema in stages/ingest.py)
Outputs: data/split/train.parquet, valid.parquet, test.parquet (same schema, rows in input order),
         reports/data/split.json (pairs and chapters per split and per book, leakage dropped)
Run:     python -m stages.split --pairs data/clean/pairs.parquet --out data/split --report reports/data/split.json
         (what `dvc repro split` runs; tests add --params FILE)

A chapter ("<corpus>/<book>/<chapter>") never spans two splits. Its split comes from
sha256("<seed>:<chapter id>") read as a number u in [0, 1): u < test_fraction -> test, u < test_fraction +
valid_fraction -> valid, else train. Each chapter's draw depends only on its own id and the seed, so
adding or removing a book never moves another book's chapters. Books in split.test_books go to test whole.
The fractions are of chapters, not of pairs; chapters vary in size, so the pair shares vary around them.

Leakage check: a classical sentence is compared in NFKC (a compatibility form, full-width letters and digits or a
Kangxi radical, is its plain character) after dropping everything but letters and digits (punctuation, spaces);
train/valid pairs whose sentence occurs in test are dropped, and counted.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.text import leakage_keys
from wenyan.files import atomic_outputs, check_paths, read_pairs, write_json
from wenyan.params import add_params_options, check_params, Float, Int, ListOf, load_params

log = get_logger("split")

SCHEMA = {  # values and their comments: params.yaml
    "seed": Int(),
    "valid_fraction": Float(min=0, below=1),  # with test_fraction below 1: check_split_params
    "test_fraction": Float(min=0, below=1),
    "test_books": ListOf(str),
}
SPLITS = ("train", "valid", "test")


def chapter_split(chapter_id: str, seed: int, valid_fraction: float, test_fraction: float) -> str:
    """The split of one chapter: a pure function of its id and the seed."""
    digest = hashlib.sha256(f"{seed}:{chapter_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def assign_splits(df, seed: int, valid_fraction: float, test_fraction: float, test_books: list[str]) -> list[str]:
    """-> "train"/"valid"/"test" for each row of df (columns corpus, book, chapter)."""
    held_out = set(test_books)
    chapter_ids = (df["corpus"] + "/" + df["book"] + "/" + df["chapter"]).tolist()
    by_chapter: dict[str, str] = {}
    for chapter_id, book in zip(chapter_ids, df["book"].tolist()):
        if chapter_id not in by_chapter:
            by_chapter[chapter_id] = (
                "test" if book in held_out else chapter_split(chapter_id, seed, valid_fraction, test_fraction)
            )
    return [by_chapter[c] for c in chapter_ids]


def check_split_params(params: dict) -> None:
    for key in ("valid_fraction", "test_fraction"):
        if not 0 <= params[key] < 1:
            raise PipelineError(f"params.yaml 'split.{key}' should be in [0, 1), got {params[key]}")
    if params["valid_fraction"] + params["test_fraction"] >= 1:
        raise PipelineError("params.yaml 'split.valid_fraction' + 'split.test_fraction' should be below 1 (train needs chapters)")
    if not all(isinstance(b, str) for b in params["test_books"]):
        raise PipelineError("params.yaml 'split.test_books' should be a list of book names")


# Long (~80 lines): the stage read top to bottom: checks, the split, the leakage check, its report, one write.
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", required=True, help="clean pairs parquet")
    parser.add_argument("--out", required=True, help="directory for train/valid/test.parquet")
    parser.add_argument("--report", required=True, help="JSON report to write")
    add_params_options(parser)
    args = parser.parse_args(argv)
    check_paths({"--pairs": args.pairs, "--params": args.params},
                {**{f"--out {s}.parquet": Path(args.out) / f"{s}.parquet" for s in SPLITS}, "--report": args.report})

    params = check_params(load_params("split", args.params), SCHEMA, "split")
    check_split_params(params)
    if args.check_params:
        return

    df = read_pairs(args.pairs, "clean")
    available = sorted(set(df["book"].unique()))
    missing = sorted(set(params["test_books"]) - set(available))
    if missing:
        raise PipelineError(
            f"params.yaml 'split.test_books': book(s) {', '.join(missing)} not in {args.pairs}; "
            f"available books: {', '.join(available)}"
        )

    split = assign_splits(df, params["seed"], params["valid_fraction"], params["test_fraction"], params["test_books"])
    df["split"] = split
    keys = leakage_keys(df["source"].tolist())
    df["key"] = keys
    test_keys = set(df.loc[df["split"] == "test", "key"])
    test_keys.discard("")  # a sentence of punctuation only says nothing about leakage
    leaked = (df["split"] != "test") & df["key"].isin(test_keys)
    leaked_per_split = {s: int((leaked & (df["split"] == s)).sum()) for s in ("train", "valid")}
    before = {s: int((df["split"] == s).sum()) for s in SPLITS}
    df = df[~leaked]

    out = Path(args.out)
    report_splits, per_book, parts = {}, {}, {}
    for s in SPLITS:
        part = parts[s] = df[df["split"] == s].drop(columns=["split", "key"]).reset_index(drop=True)
        chapters = part["corpus"] + "/" + part["book"] + "/" + part["chapter"]
        report_splits[s] = {
            "pairs": len(part),
            "chapters": int(chapters.nunique()),
            "books": int(part["book"].nunique()),
            "pairs_before_leakage_check": before[s],
            "dropped_leakage": leaked_per_split.get(s, 0),
        }
        for book, n in (part["corpus"] + "/" + part["book"]).value_counts().items():
            per_book.setdefault(book, dict.fromkeys(SPLITS, 0))[s] = int(n)
        if len(part) == 0 and s == "valid" and params["valid_fraction"] > 0:  # train refuses it with eval_samples > 0
            log.warning("the valid split is empty although split.valid_fraction is %s (too few chapters for it); train "
                        "stops before loading its model while train.eval_samples > 0", params["valid_fraction"])
    if report_splits["train"]["pairs"] == 0:
        raise PipelineError(
            f"the train split is empty ({len(df):,} pairs in {args.pairs}); lower split.valid_fraction/test_fraction "
            "or test_books, or if clean kept too few pairs, check clean.min_chars/max_chars/max_ratio"
        )
    if report_splits["test"]["pairs"] == 0:  # evaluate would fail only after training
        raise PipelineError(
            f"the test split is empty ({len(df):,} pairs in {args.pairs}): evaluate needs test sentences; raise "
            f"split.test_fraction, name split.test_books, or change split.seed")
    total = sum(r["pairs"] for r in report_splits.values())
    log.info(
        "%s pairs: %s",
        f"{total:,}",
        "; ".join(f"{s} {r['pairs']:,} ({r['chapters']:,} chapters)" for s, r in report_splits.items()),
    )
    log.info(
        "leakage check: dropped %s train and %s valid pairs whose classical sentence is also in test",
        f"{leaked_per_split['train']:,}", f"{leaked_per_split['valid']:,}",
    )
    report = {
        "pairs": total,
        "splits": report_splits,
        "pair_fractions": {s: round(r["pairs"] / total, 4) for s, r in report_splits.items()},
        "leakage_dropped": leaked_per_split,
        "params": params,
        "pairs_per_book": dict(sorted(per_book.items())),
    }
    # only once every check passed, and all together: a failed run keeps the last good splits and report
    with atomic_outputs(*(out / f"{s}.parquet" for s in parts), args.report) as (*part_tmps, report_tmp):
        for part, tmp in zip(parts.values(), part_tmps):
            part.to_parquet(tmp, index=False)
        write_json(report_tmp, report)


if __name__ == "__main__":
    run_main(main)
