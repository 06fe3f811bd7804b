"""Metrics: corpus BLEU (sacrebleu, tokenize=zh) and chrF with their signatures, sentence chrF, breakdowns by group,
and the evaluated sample (evaluate, evaluate_base, export and the benchmarks score with these)."""

from __future__ import annotations

import csv
import hashlib
import io

from wenyan.errors import PipelineError
from wenyan.params import Float, Int, ListOf

BLEU_TOKENIZE = "zh"  # sacrebleu's Chinese tokenization: every CJK character a token


# ----------------------------------------------------------------------------------------------
# The evaluated sample: the evaluate section of params.yaml (evaluate reads all of it, evaluate_base the keys
# that decide which sentences are generated and how), the test rows' schema, the deterministic sample


EVALUATE_SCHEMA = {  # values and their comments: params.yaml
    "num_samples": Int(min=0),  # 0 = all
    "seed": Int(),
    "batch_size": Int(min=1),
    "num_beams": Int(min=1),
    "max_new_tokens_factor": Float(above=0, max=100),  # more would let a sentence that never stops run for hours
    "max_new_tokens_extra": Int(min=0),
    "baselines": ListOf(str),  # of KNOWN_BASELINES
    "bootstrap_resamples": Int(min=0),  # 0 or >= 2
    "length_buckets": ListOf(int),  # increasing
    "num_examples": Int(min=0),
    "num_gpus": Int(above=0),  # > 1: generation sharded over that many GPUs (torchrun); metrics as with 1
}


KNOWN_BASELINES = ("copy", "base")


def check_test_rows(rows: list[dict], path, lines: list[int] | None = None) -> None:
    """The format stage's schema (wenyan.artifacts.TEST_ROW): an id of its own, source and target strings, and messages
    ending with the user's turn and the assistant's reference; a bad row is one error naming its line and field.
    Some rows must be of the chapter test (not unseen_book): the headline metrics score those."""
    from wenyan import artifacts

    if not rows:
        raise PipelineError(f"{path}: no test rows")
    artifacts.check_rows(rows, artifacts.TEST_ROW, path, "rewrite it with the format stage (dvc repro format)",
                         unique="id", lines=lines)
    if all(unseen_book(r) for r in rows):
        raise PipelineError(f"{path}: all {len(rows)} test rows have unseen_book true (books without a train or valid "
                            f"row), none is of the chapter test that metrics.json's headline scores; raise "
                            f"split.test_fraction or hold out fewer books (split.test_books)")


def unseen_book(row: dict) -> bool:
    """A test row of a book with no train or valid row (the format stage's field unseen_book)."""
    return row.get("unseen_book") is True


def select_rows(rows: list[dict], num_samples: int, seed: int) -> list[dict]:
    """A deterministic sample: the rows with the smallest hash of (seed, id), kept in file order.

    Every row has the same chance whatever its book or chapter, so the sample spreads across books in
    proportion to their size, and a row's selection does not move when other rows are added."""
    if num_samples == 0 or num_samples >= len(rows):
        return list(rows)

    def key(item):
        index, row = item
        return hashlib.sha1(f"{seed}:{row.get('id', index)}".encode()).hexdigest()

    chosen = sorted(sorted(enumerate(rows), key=key)[:num_samples], key=lambda item: item[0])
    return [row for _, row in chosen]


def select_evaluated(rows: list[dict], num_samples: int, seed: int) -> list[dict]:
    """The sentences evaluate and evaluate_base translate: the chapter test (rows without unseen_book) and the
    unseen-book test each sampled by select_rows(group, num_samples, seed), so each group gets up to num_samples
    sentences, kept in file order. Without unseen-book rows this is select_rows(rows, num_samples, seed)."""
    groups = ([r for r in rows if not unseen_book(r)], [r for r in rows if unseen_book(r)])
    chosen = {id(r) for group in groups for r in select_rows(group, num_samples, seed)}
    return [r for r in rows if id(r) in chosen]


# ----------------------------------------------------------------------------------------------
# Scores


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus BLEU (tokenize=zh) rounded as sacrebleu prints it, and its signature."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize=BLEU_TOKENIZE)
    return round(metric.corpus_score(list(hypotheses), [list(references)]).score, 2), str(metric.get_signature())


def score(hypotheses: list[str], references: list[str], n_bootstrap: int = 0) -> dict:
    """Corpus BLEU (tokenize='zh') and chrF, rounded as sacrebleu prints them, with signatures; with
    n_bootstrap >= 2 also BLEU's 95% CI (sacrebleu's bootstrap: mean +- half the 2.5-97.5 percentile
    range of the resampled scores)."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(tokenize=BLEU_TOKENIZE), CHRF()
    refs = [list(references)]
    b = bleu.corpus_score(list(hypotheses), refs, n_bootstrap=max(n_bootstrap, 1))
    c = chrf.corpus_score(list(hypotheses), refs)
    result = {"bleu": round(b.score, 2), "chrf": round(c.score, 2)}
    if n_bootstrap >= 2:
        result["bleu_ci95"] = {"low": round(b._mean - b._ci, 2), "high": round(b._mean + b._ci, 2)}
    result["bleu_signature"] = str(bleu.get_signature())
    result["chrf_signature"] = str(chrf.get_signature())
    return result


def sentence_chrf(hypotheses: list[str], references: list[str]) -> list[float]:
    from sacrebleu import sentence_chrf as chrf

    return [round(chrf(h, [r]).score, 2) for h, r in zip(hypotheses, references)]


def length_bucket(n_chars: int, bounds: list[int]) -> str:
    """'1-10', '11-20', '21-40', '41+' for bounds [10, 20, 40]."""
    low = 1
    for high in bounds:
        if n_chars <= high:
            return f"{low}-{high}"
        low = high + 1
    return f"{low}+"


def breakdown(groups: list[str], references: list[str], systems: dict[str, list[str]], order: list[str] | None = None):
    """One row per group: n, bleu, chrf of the model, then <baseline>_bleu, <baseline>_chrf."""
    rows = []
    for group in order or sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == group]
        if not idx:
            continue
        row = {"n": len(idx)}
        for name, hyps in systems.items():
            s = score([hyps[i] for i in idx], [references[i] for i in idx])
            prefix = "" if name == "model" else f"{name}_"
            row[f"{prefix}bleu"], row[f"{prefix}chrf"] = s["bleu"], s["chrf"]
        rows.append((group, row))
    return rows


def to_csv(key: str, rows) -> str:
    buf = io.StringIO()
    writer = None
    for group, row in rows:
        if writer is None:
            writer = csv.DictWriter(buf, fieldnames=[key, *row], lineterminator="\n")
            writer.writeheader()
        writer.writerow({key: group, **row})
    return buf.getvalue()
