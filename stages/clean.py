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
Then a pair is dropped by the first rule it fails: empty (either side), too_short (< min_chars on a
side), too_long (> max_chars on a side), ratio (long side / short side > max_ratio), duplicate (same
source and target as an earlier pair, when dedupe is on).
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata

from stages.common import PipelineError, atomic_outputs, check_params, get_logger, load_params, read_pairs, run_main, write_json

log = get_logger("clean")

DEFAULTS = {
    "opencc": "t2s",  # OpenCC config name (t2s, s2t, t2tw, ...) or none
    "min_chars": 2,
    "max_chars": 200,
    "max_ratio": 4.0,
    "dedupe": True,
}
RULES = ("empty", "too_short", "too_long", "ratio", "duplicate")

# CJK characters and CJK/full-width punctuation: a space next to one of these is dropped, and a
# half-width , ; : ? ! ( ) touching one becomes full-width. Includes the Private Use Area, where the
# corpus keeps rare characters, and the geometric shapes (□ ○ ■) it uses for illegible ones.
WIDE = (
    "\u00b7\u2014\u2015\u2018-\u201f\u2026\u2236\u25a0-\u25ff\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff"
    "\u3100-\u312f\u31a0-\u31ff\u3200-\u9fff\ua000-\ua4cf\uac00-\ud7af\ue000-\uf8ff\uf900-\ufaff"
    "\ufe10-\ufe1f\ufe30-\ufe6f\uff00-\uffef\U00020000-\U0003ffff"
)
HALF_PUNCT = ",;:?!()\u2236"
TO_FULL = str.maketrans(",;:?!()\u2236", "，；：？！（）：")
SMALL_FORMS = str.maketrans("﹐﹑﹔﹕﹖﹗﹙﹚", "，、；：？！（）")

_WHITESPACE_RUN = re.compile(r"[^\S\n]+")
_SPACE_TO_DROP = re.compile(rf" (?:(?<=[{WIDE}] )|(?=[{WIDE}]|$))|^ ", re.MULTILINE)  # after runs became one space
_WIDE_CHAR = re.compile(f"[{WIDE}]")
_PUNCT_RUN = re.compile(f"[{re.escape(HALF_PUNCT)}]+")
_SMALL_FORM = re.compile("[﹐﹑﹔﹕﹖﹗﹙﹚]")
_HALF_OPEN_PAIR = re.compile(r"\(([^()（）\n]*)）")
_HALF_CLOSE_PAIR = re.compile(r"（([^()（）\n]*)\)")
_control_chars = None


def control_chars_re() -> re.Pattern:
    """Cc and Cf characters that are not whitespace (whitespace is collapsed instead)."""
    global _control_chars
    if _control_chars is None:
        codes = [
            c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cf") and not chr(c).isspace()
        ]
        ranges, start = [], codes[0]  # a class of ranges runs ~20x faster than one of 200 single characters
        for prev, code in zip(codes, codes[1:] + [None]):
            if code is None or code != prev + 1:
                ranges.append(re.escape(chr(start)) + ("-" + re.escape(chr(prev)) if prev > start else ""))
                start = code
        _control_chars = re.compile("[" + "".join(ranges) + "]")
    return _control_chars


# ----------------------------------------------------------------------------------------------
# Normalisation


def make_converter(config):
    """clean.opencc -> an opencc.OpenCC, or None for no conversion. An unknown config is an error."""
    if config is None or str(config).lower() in ("", "none"):
        return None
    import opencc

    valid = sorted(c.removesuffix(".json") for c in opencc.CONFIGS)
    name = str(config).removesuffix(".json")
    if name not in valid:
        raise PipelineError(f"params.yaml 'clean.opencc': unknown OpenCC config {config!r}; valid: {', '.join(valid)}, none")
    try:
        return opencc.OpenCC(name)
    except RuntimeError as exc:
        raise PipelineError(f"params.yaml 'clean.opencc': OpenCC could not load {config!r}: {exc}") from None


def normalise_lines(lines: list[str], converter=None, counts: dict | None = None) -> list[str]:
    """Apply steps 1-5 of the module docstring to every line; counts (if given) gets what changed.

    Works on all lines joined with "\\n", so each regex and OpenCC run once over a big block instead of
    once a line (a line's own newlines were whitespace and become spaces first).
    """
    counts = {} if counts is None else counts
    lines = [s if s is not None else "" for s in lines]
    n_nfc = 0
    for i, s in enumerate(lines):
        if not unicodedata.is_normalized("NFC", s):
            lines[i] = unicodedata.normalize("NFC", s)
            n_nfc += 1
    text = "\n".join(lines)
    if text.count("\n") != len(lines) - 1:  # a line with newlines inside (jsonl)
        text = "\n".join(s.replace("\n", " ") for s in lines)
    text, n_control = control_chars_re().subn("", text)
    length = len(text)
    text = _WHITESPACE_RUN.sub(" ", text)
    text = _SPACE_TO_DROP.sub("", text)
    n_space = length - len(text)
    text, n_punct = _SMALL_FORM.subn(lambda m: m.group().translate(SMALL_FORMS), text)

    def to_full(m: re.Match) -> str:
        nonlocal n_punct
        start, end = m.span()
        if (start and _WIDE_CHAR.match(text, start - 1)) or _WIDE_CHAR.match(text, end):
            n_punct += end - start
            return m.group().translate(TO_FULL)
        return m.group()

    text = _PUNCT_RUN.sub(to_full, text)
    text, n1 = _HALF_OPEN_PAIR.subn(r"（\1）", text)
    text, n2 = _HALF_CLOSE_PAIR.subn(r"（\1）", text)
    n_punct += n1 + n2
    out = text.split("\n")
    n_opencc = 0
    if converter is not None:
        converted = converter.convert(text).split("\n")
        if len(converted) != len(out):  # never seen; OpenCC maps line by line
            converted = [converter.convert(s) for s in out]
        n_opencc = sum(a != b for a, b in zip(out, converted))
        out = converted
    assert len(out) == len(lines), "normalisation changed the number of lines"
    for key, n in (
        ("nfc_lines", n_nfc),
        ("control_chars_removed", n_control),
        ("whitespace_chars_removed", n_space),
        ("punctuation_made_full_width", n_punct),
        ("opencc_lines_changed", n_opencc),
    ):
        counts[key] = counts.get(key, 0) + n
    return out


def normalise_text(text: str, converter=None) -> str:
    return normalise_lines([text], converter)[0]


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", required=True, help="ingest's pairs parquet")
    parser.add_argument("--out", required=True, help="clean pairs parquet to write")
    parser.add_argument("--report", required=True, help="JSON report to write")
    parser.add_argument("--params", default=None, help="params.yaml to read instead of DVC's (tests, benchmarks)")
    args = parser.parse_args(argv)

    params = check_params(load_params("clean", args.params), DEFAULTS, "clean")
    check_clean_params(params)
    converter = make_converter(params["opencc"])  # before any work: a typo fails at once

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
