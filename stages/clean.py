"""Clean: normalise both sides of every pair, then drop empty, too short/long, lopsided and duplicate pairs.

Inputs:  data/ingest/pairs.parquet (schema in stages/ingest.py)
Outputs: data/clean/pairs.parquet (same schema, normalised text, fewer rows),
         reports/data/clean.json (pairs kept, dropped per rule, characters changed per normalisation)
Run:     python -m stages.clean --pairs data/ingest/pairs.parquet --out data/clean/pairs.parquet \
             --report reports/data/clean.json          (what `dvc repro clean` runs; tests add --params FILE)

Normalisation, in this order, on each side:
  1. Unicode NFC (CJK compatibility ideographs become their unified forms).
  2. Control characters (Cc) and format characters (Cf: zero-width space/joiners, BOM, bidi marks)
     removed; whitespace controls (tab, CR, ...) count as whitespace instead.
  3. Whitespace: every run (incl. U+3000 ideographic space) becomes one space; that space is kept only
     between two non-CJK characters (`Latin words`), and dropped at either end of the line and next to
     a CJK character or CJK/full-width punctuation -- the corpus left a space where each quotation
     mark was (`问曰： 若何有？ ` -> `问曰：若何有？`).
  4. Punctuation: a run of half-width , ; : ? ! ( ) (and U+2236 ∶, used as a colon) touching a CJK
     character or CJK punctuation on either side becomes full-width ，；：？！（）; a half-width
     bracket left facing a full-width one is made full-width too (`（注)` -> `（注）`). Small form
     variants ﹐﹑﹔﹕﹖﹗﹙﹚ always become ，、；：？！（）. Full stops and quotation marks are left
     alone: `.` is also a decimal point, and straight quotes don't say whether they open or close.
     Between Latin characters (`3:5`, `a, b`) nothing changes.
  5. OpenCC with clean.opencc (t2s by default), applied to whole blocks of lines at once for speed.
(Steps 1-5 live in wenyan/text.py: evaluate and translate apply them too.)
Then a pair is dropped by the first rule it fails: empty (either side), too_short (< min_chars on a
side), too_long (> max_chars on a side), ratio (long side / short side > max_ratio), duplicate (same
source and target as an earlier pair, when dedupe is on).
"""

from __future__ import annotations

import argparse

from wenyan.text import make_converter, normalise_lines
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.files import atomic_outputs, check_paths, read_pairs, write_json
from wenyan.params import add_params_options, Bool, check_params, Float, Int, load_params, Str

log = get_logger("clean")

SCHEMA = {  # values and their comments: params.yaml
    "opencc": Str(),  # an OpenCC config name (t2s, s2t, t2tw, ...) or none: checked by text.make_converter
    "min_chars": Int(min=0),
    "max_chars": Int(min=1),
    "max_ratio": Float(min=1),
    "dedupe": Bool(),
}
RULES = ("empty", "too_short", "too_long", "ratio", "duplicate")


# ----------------------------------------------------------------------------------------------
# Filters


def drop_reasons(source, target, min_chars: int, max_chars: int, max_ratio: float, dedupe: bool):
    """pandas Series of str -> Series: "" for a kept pair, else the first rule it fails (see RULES)."""
    import numpy as np
    import pandas as pd

    ls = source.str.len().to_numpy()
    lt = target.str.len().to_numpy()
    short, long_ = np.minimum(ls, lt), np.maximum(ls, lt)
    conditions = [
        short == 0,
        short < min_chars,
        long_ > max_chars,
        long_ > max_ratio * np.maximum(short, 1),
    ]
    reason = np.select(conditions, list(RULES[:4]), default="").astype(object)
    if dedupe:
        frame = pd.DataFrame({"s": source.to_numpy(), "t": target.to_numpy()})
        # among pairs that pass the other rules: a pair counts under the first rule it fails
        dup = frame[reason == ""].duplicated(keep="first")
        reason[dup[dup].index.to_numpy()] = "duplicate"
    return pd.Series(reason, index=source.index)


def check_clean_params(params: dict) -> None:
    for key in ("min_chars", "max_chars"):
        if params[key] < 0:
            raise PipelineError(f"params.yaml 'clean.{key}' should be >= 0, got {params[key]}")
    if params["max_chars"] < max(params["min_chars"], 1):
        raise PipelineError(f"params.yaml 'clean.max_chars' ({params['max_chars']}) is below min_chars ({params['min_chars']})")
    if params["max_ratio"] < 1:
        raise PipelineError(f"params.yaml 'clean.max_ratio' should be >= 1, got {params['max_ratio']}")


# Long (~60 lines): the stage read top to bottom: arguments and checks, the filters in order, the report.
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", required=True, help="ingest's pairs parquet")
    parser.add_argument("--out", required=True, help="clean pairs parquet to write")
    parser.add_argument("--report", required=True, help="JSON report to write")
    add_params_options(parser)
    args = parser.parse_args(argv)
    check_paths({"--pairs": args.pairs, "--params": args.params}, {"--out": args.out, "--report": args.report})

    params = check_params(load_params("clean", args.params), SCHEMA, "clean")
    check_clean_params(params)
    converter = make_converter(params["opencc"])  # before any work: a typo fails at once
    if args.check_params:
        return

    import pandas as pd
    from tqdm import tqdm

    df = read_pairs(args.pairs, "ingest")
    n_in = len(df)
    changed = {}
    for side in tqdm(("source", "target"), desc="normalise", unit="side", disable=None):
        changed[side] = {}
        df[side] = pd.Series(normalise_lines(df[side].tolist(), converter, changed[side]), index=df.index, dtype="str")
        log.info("%s: %s", side, ", ".join(f"{k} {v:,}" for k, v in changed[side].items()))

    reason = drop_reasons(df["source"], df["target"], params["min_chars"], params["max_chars"], params["max_ratio"], params["dedupe"])
    dropped = {rule: int((reason == rule).sum()) for rule in RULES}
    kept_df = df[reason == ""].reset_index(drop=True)
    kept = len(kept_df)
    log.info(
        "kept %s/%s pairs; %s empty, %s too short (< %d chars), %s too long (> %d chars), "
        "%s with length ratio > %g, %s duplicates",
        f"{kept:,}", f"{n_in:,}", f"{dropped['empty']:,}", f"{dropped['too_short']:,}", params["min_chars"],
        f"{dropped['too_long']:,}", params["max_chars"], f"{dropped['ratio']:,}", params["max_ratio"],
        f"{dropped['duplicate']:,}",
    )
    if kept == 0:
        raise PipelineError(f"clean kept no pairs out of {n_in:,}; check clean.min_chars/max_chars/max_ratio")

    dropped_per_book = (
        pd.DataFrame({"book": df["corpus"] + "/" + df["book"], "reason": reason})[reason != ""]
        .groupby(["book", "reason"]).size().unstack(fill_value=0)
    )
    report = {
        "pairs_in": n_in,
        "pairs_kept": kept,
        "pairs_dropped": n_in - kept,
        "dropped": dropped,
        "normalised": changed,
        "params": params,
        "kept_per_book": {k: int(v) for k, v in (kept_df["corpus"] + "/" + kept_df["book"]).value_counts().sort_index().items()},
        "dropped_per_book": {b: {r: int(n) for r, n in row.items() if n} for b, row in dropped_per_book.iterrows()},
        "chars_mean": {
            "source": round(float(kept_df["source"].str.len().mean()), 2),
            "target": round(float(kept_df["target"].str.len().mean()), 2),
        },
    }
    with atomic_outputs(args.out, args.report) as (out_tmp, report_tmp):  # both change together, or neither
        kept_df.to_parquet(out_tmp, index=False)
        write_json(report_tmp, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    run_main(main)
