"""Evaluate: translate test sentences with the fine-tuned model and score them against the references.

    data/format/test.jsonl + models/adapter + data/evaluate/base_outputs.jsonl (stage evaluate_base)
      -> reports/metrics.json            BLEU (tokenize=zh), chrF, the baselines' BLEU/chrF, BLEU's bootstrap 95% CI
                                         (the chapter test; the unseen books apart, under unseen_books)
      -> reports/evaluate/scores.csv     per system (model, copy, base; model@unseen_books ...): BLEU + CI, chrF,
                                         limits hit, signatures
      -> reports/evaluate/by_book.csv    BLEU/chrF per book, model and baselines
      -> reports/evaluate/by_length.csv  BLEU/chrF per source-length bucket (characters)
      -> reports/evaluate/samples.md     best, worst and a spread of outputs by sentence chrF
      -> data/evaluate/hypotheses.jsonl  every output with its provenance (id, book, chapter, line[, unseen_book])

Run it:  dvc repro evaluate
   or:   python -m stages.evaluate --test data/format/test.jsonl --model models/adapter \
             --metrics reports/metrics.json --out-dir reports/evaluate \
             --hypotheses data/evaluate/hypotheses.jsonl \
             [--base-outputs data/evaluate/base_outputs.jsonl] [--params params.yaml]

The prompt of a test row is messages[:-1] (system + user, as in training); the reference is `target`.
Outputs get the references' treatment before scoring: wenyan/text.py's normalisation and the OpenCC
conversion the model was trained with (its training_config.json `prompt.opencc`, recorded by train).

Two test groups, sampled and scored apart (wenyan.metrics.select_evaluated: up to evaluate.num_samples each):
the chapter test (test chapters of books train has too: the headline numbers of metrics.json and scores.csv's
`model`, `copy`, `base`) and the unseen books (rows with unseen_book true, stages/format.py: books without a
train or valid row, e.g. split.test_books: metrics.json's `unseen_books`, scores.csv's `<system>@unseen_books`).
by_book.csv, by_length.csv, samples.md and hypotheses.jsonl cover both. Without unseen-book rows every output is
what it was before the groups existed.

Baselines (params evaluate.baselines) are scored on the same sentences:
  copy  the classical source unchanged (how far modern Chinese is from the classical text)
  base  the model before fine-tuning (train.model, loaded on its own), same prompts
The base baseline's outputs depend only on the base model, the sample, the prompt and the generation
settings, never on the fine-tuned model: they come from the stage evaluate_base (stages/evaluate_base.py),
which DVC skips while only train.* params change, and restores from its run cache when they change back.

Generation is wenyan/generation.py's generate(): batched with left padding, greedy unless
evaluate.num_beams > 1, stops at the end-of-turn token, each sentence cut at its own budget
(max_new_tokens = factor x source tokens + extra); on CPU greedy decoding runs generation.greedy_batch
(reports/benchmarks/generation.md), on CUDA generation.slot_greedy in bf16 (evaluate.batch_size slots, a sentence
leaving its slot when it ends: reports/benchmarks/generation_gpu.md). Scores: wenyan/metrics.py (sacrebleu, with signatures).

Several GPUs (evaluate.num_gpus > 1, both stages): the command starts itself again under torchrun, one
process per GPU (wenyan/distributed.py, as train.num_gpus does); each process generates every
num_gpus-th batch of the length-sorted sentences, the outputs are gathered in their original order and
rank 0 alone scores and writes, so the reports are byte for byte those of one process
(tests/test_evaluate.py, evaluate.num_gpus: two gloo processes on CPU). `torchrun --nproc_per_node N -m stages.evaluate ...`
by hand works too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from wenyan import distributed, generation, models, text
from wenyan.errors import PipelineError, get_logger, run_main
from wenyan.files import atomic_outputs, check_output_path, read_jsonl, write_json, write_jsonl, write_text
from wenyan.metrics import (EVALUATE_SCHEMA, KNOWN_BASELINES, breakdown, check_test_rows, length_bucket, score,
                            select_evaluated, sentence_chrf, to_csv, unseen_book)
from wenyan.params import add_params_options, check_params, load_params
from wenyan.prompt import end_of_turn_ids
from wenyan import artifacts
from wenyan.files import check_paths, with_path_errors

log = get_logger("evaluate")

OUT_DIR_FILES = ("by_book.csv", "by_length.csv", "scores.csv", "samples.md")  # what evaluate writes into --out-dir
SCHEMA = EVALUATE_SCHEMA  # values and their comments: params.yaml; evaluate_base reads some of its keys too
UNSEEN = "unseen_books"  # the unseen-book group: its key in metrics.json, its systems' suffix in scores.csv


# ----------------------------------------------------------------------------------------------
# Parameters and inputs


def check_evaluate_params(section: dict) -> dict:
    p = check_params(section, SCHEMA, "evaluate")
    unknown = [b for b in p["baselines"] if b not in KNOWN_BASELINES]
    if len(set(p["baselines"])) != len(p["baselines"]):
        raise PipelineError(f"evaluate.baselines: {p['baselines']} names one twice; give each once")
    if unknown:
        raise PipelineError(f"evaluate.baselines: unknown {unknown}; choose from {list(KNOWN_BASELINES)}")
    bounds = p["length_buckets"]
    if not bounds or any(not isinstance(b, int) or b < 1 for b in bounds) or bounds != sorted(set(bounds)):
        raise PipelineError(f"evaluate.length_buckets must be increasing positive integers, got {bounds}")
    if p["bootstrap_resamples"] < 0 or p["bootstrap_resamples"] == 1:
        raise PipelineError("evaluate.bootstrap_resamples must be 0 (no CI) or >= 2")
    return p


def postprocess(texts: list[str], opencc_config: str | None) -> list[str]:
    """What the references went through in the clean stage: its normalisation (NFC, control characters,
    whitespace, full-width punctuation) and OpenCC conversion with the model's recorded config ('none' = none)."""
    return text.normalise_lines(list(texts), text.make_converter(opencc_config))


def read_base_outputs(path: Path, rows: list[dict]) -> tuple[list[str], list[bool]]:
    """The evaluate_base stage's outputs for these rows, in their order; a missing sentence is an error."""
    found, lines = read_jsonl(path, with_lines=True)
    artifacts.check_rows(found, artifacts.BASE_OUTPUT_ROW, path, "rerun the evaluate_base stage (dvc repro evaluate_base)",
                         unique="id", lines=lines)
    by_id = {r["id"]: r for r in found}
    missing = [r.get("id") for r in rows if r.get("id") not in by_id]
    if missing:
        raise PipelineError(f"{path}: no base output for {len(missing)} evaluated sentence(s) (e.g. {missing[0]}); "
                            f"rerun the evaluate_base stage (dvc repro evaluate_base)")
    return [by_id[r["id"]]["output"] for r in rows], [by_id[r["id"]]["hit_limit"] for r in rows]


# ----------------------------------------------------------------------------------------------
# Samples page


def pick_examples(chrf: list[float], n: int) -> dict[str, list[int]]:
    """Indices for samples.md: the n//4 best and worst by sentence chrF, the rest evenly spread."""
    ranked = sorted(range(len(chrf)), key=lambda i: (-chrf[i], i))
    n = min(n, len(ranked))
    k = n // 4
    best, worst = ranked[:k], ranked[len(ranked) - k :][::-1] if k else []
    middle = ranked[k : len(ranked) - k]
    m = n - 2 * k
    spread = [middle[round(j * (len(middle) - 1) / max(m - 1, 1))] for j in range(m)] if middle and m else []
    return {"best": best, "spread": sorted(set(spread), key=lambda i: (-chrf[i], i)), "worst": worst}


def render_samples(rows: list[dict], systems: dict[str, list[str]], chrf: dict[str, list[float]], picks, header: str) -> str:
    def line(text: str) -> str:
        return text.replace("\n", " ").replace("|", "\\|") if text else "*(empty)*"

    titles = {"best": "Best by sentence chrF", "spread": "A spread from best to worst", "worst": "Worst by sentence chrF"}
    out = ["# Evaluation samples", "", header, ""]
    for part in ("best", "spread", "worst"):
        if not picks[part]:
            continue
        out += [f"## {titles[part]}", ""]
        for i in picks[part]:
            row = rows[i]
            where = " · ".join(str(row[k]) for k in ("book", "chapter", "line") if row.get(k) not in (None, ""))
            where += " (unseen book)" if unseen_book(row) else ""
            scores = f"chrF {chrf['model'][i]:.1f}" + (f" (base {chrf['base'][i]:.1f})" if "base" in chrf else "")
            out += [f"### {where or row.get('id', i)} — {scores}", "", f"- **id:** `{row.get('id', i)}`"]
            out.append(f"- **Source:** {line(row['source'])}")
            out.append(f"- **Reference:** {line(row['target'])}")
            out.append(f"- **Output:** {line(systems['model'][i])}")
            if "base" in systems:
                out.append(f"- **Base output:** {line(systems['base'][i])}")
            out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------


def group_scores(systems: dict[str, list[str]], references: list[str], hits: dict[str, list[bool]], idx: list[int],
                 n_bootstrap: int) -> tuple[dict[str, dict], dict[str, int]]:
    """Each system's score() and limits hit on the evaluated rows idx (the chapter test, or the unseen books)."""
    refs = [references[i] for i in idx]
    scores = {name: score([hyps[i] for i in idx], refs, n_bootstrap) for name, hyps in systems.items()}
    return scores, {name: sum(hit[i] for i in idx) for name, hit in hits.items()}


def group_metrics(scores: dict[str, dict], n_sentences: int, baselines: list[str]) -> dict:
    """One group's numbers: the model's BLEU and chrF, the baselines' (evaluate.baselines' order), BLEU's CI (with
    bootstrap) and the sentences scored."""
    model_scores = scores["model"]
    metrics = {
        "bleu": model_scores["bleu"],
        "chrf": model_scores["chrf"],
        "baselines": {name: {"bleu": scores[name]["bleu"], "chrf": scores[name]["chrf"]}  # evaluate.baselines' order
                      for name in baselines if name in scores},
        "bleu_ci95": model_scores.get("bleu_ci95"),
        "n_sentences": n_sentences,
    }
    if metrics["bleu_ci95"] is None:
        del metrics["bleu_ci95"]
    return metrics


def metrics_json(scores: dict[str, dict], limits: dict[str, int], n_sentences: int, baselines: list[str],
                 unseen: tuple[dict[str, dict], int, list[str]] | None = None) -> dict:
    """reports/metrics.json: the numbers runs are compared by (dvc metrics diff, dvc exp show), in the order a reader
    wants them; the BLEU/chrF signatures, the baselines' CIs and limits are in reports/evaluate/scores.csv. scores
    are the chapter test's; unseen, (scores, n_sentences, books) of the unseen-book rows, goes under "unseen_books"."""
    metrics = {**group_metrics(scores, n_sentences, baselines), "hit_max_new_tokens": limits["model"]}
    if unseen is not None:
        unseen_scores, unseen_n, books = unseen
        metrics[UNSEEN] = {**group_metrics(unseen_scores, unseen_n, baselines), "books": books}
    return metrics


def score_rows(scores: dict[str, dict], limits: dict[str, int], n_sentences: int, suffix: str = "") -> list:
    """scores.csv's rows of one group, a system a row (its name + suffix): BLEU with its CI, chrF, limits hit,
    signatures."""
    return [(f"{name}{suffix}", {"n": n_sentences, "bleu": s["bleu"], "bleu_low": (s.get("bleu_ci95") or {}).get("low", ""),
                                 "bleu_high": (s.get("bleu_ci95") or {}).get("high", ""), "chrf": s["chrf"],
                                 "hit_max_new_tokens": limits.get(name, ""), "bleu_signature": s["bleu_signature"],
                                 "chrf_signature": s["chrf_signature"]})
            for name, s in scores.items()]


def hypotheses_with_provenance(rows: list[dict], systems: dict[str, list[str]], chrf: dict[str, list[float]]) -> list[dict]:
    """data/evaluate/hypotheses.jsonl: every output with its provenance, reference and sentence chrF; where some rows
    are of unseen books, every row says whether it is (unseen_book)."""
    out_rows = []
    with_unseen = any(unseen_book(r) for r in rows)
    for i, row in enumerate(rows):
        out = {k: row.get(k) for k in ("id", "book", "chapter", "line")}
        if with_unseen:
            out["unseen_book"] = unseen_book(row)
        out |= {"source": row["source"], "reference": row["target"], "hypothesis": systems["model"][i],
                "chrf": chrf["model"][i]}
        if "base" in systems:
            out |= {"base": systems["base"][i], "base_chrf": chrf["base"][i]}
        out_rows.append(out)
    return out_rows


# Long (~110 lines): the stage read top to bottom: inputs and checks, generation, scores, the five outputs at once.
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test", required=True, type=Path, help="data/format/test.jsonl")
    parser.add_argument("--model", required=True, type=Path, help="models/adapter (written by the train stage)")
    parser.add_argument("--metrics", required=True, type=Path, help="reports/metrics.json")
    parser.add_argument("--out-dir", required=True, type=Path, help="reports/evaluate")
    parser.add_argument("--hypotheses", required=True, type=Path, help="data/evaluate/hypotheses.jsonl")
    parser.add_argument("--base-outputs", type=Path, default=None,
                        help="data/evaluate/base_outputs.jsonl: the evaluate_base stage's outputs (needed for baseline base)")
    add_params_options(parser)
    args = parser.parse_args(argv)
    for path, directory in ((args.metrics, False), (args.hypotheses, False), (args.out_dir, True)):
        check_output_path(path, directory=directory)  # before the model runs, not after
    model_inputs = models.model_inputs(args.model)
    inputs = {**model_inputs, "--test": args.test, "--base-outputs": args.base_outputs,
              "--params": args.params}  # the base behind an adapter is read too: never an output
    check_paths(inputs,
                {"--metrics": args.metrics, "--hypotheses": args.hypotheses,
                 **{f"--out-dir {name}": args.out_dir / name for name in OUT_DIR_FILES}}, dirs=list(model_inputs))

    p = check_evaluate_params(load_params("evaluate", args.params))
    if args.check_params:
        return
    if distributed.relaunched("stages.evaluate", "evaluate.num_gpus", p["num_gpus"], argv,
                              quiet=[log, models.log, generation.log]):
        return
    all_rows, lines = read_jsonl(args.test, with_lines=True)
    check_test_rows(all_rows, args.test, lines)
    rows = select_evaluated(all_rows, p["num_samples"], p["seed"])
    chapter = [i for i, r in enumerate(rows) if not unseen_book(r)]  # the two groups, as indices into rows
    unseen = [i for i, r in enumerate(rows) if unseen_book(r)]
    books = sorted({str(r.get("book", "")) for r in rows})
    unseen_books = sorted({str(rows[i].get("book", "")) for i in unseen})
    log.info("scoring %d of %d test sentences (%d books)", len(rows), len(all_rows), len(books))
    if unseen:
        n_unseen = sum(unseen_book(r) for r in all_rows)
        log.info("  chapter test %d of %d; unseen books %d of %d (%s)", len(chapter), len(all_rows) - n_unseen,
                 len(unseen), n_unseen, ", ".join(unseen_books))
    trained = models.load_trained(args.model, model=False)  # config, prompt, tokenizer: cheap checks first
    cfg, tokenizer, backend = trained.config, trained.tokenizer, trained.backend
    opencc = trained.prompt["opencc"]  # the references' OpenCC conversion, as recorded by train
    text.make_converter(opencc)  # an unknown config fails now, not after generating

    sources = [r["source"] for r in rows]
    references = [r["target"] for r in rows]
    prompts = [r["messages"][:-1] for r in rows]
    systems: dict[str, list[str]] = {}
    hits: dict[str, list[bool]] = {}
    gen = dict(batch_size=p["batch_size"], num_beams=p["num_beams"], factor=p["max_new_tokens_factor"],
               extra=p["max_new_tokens_extra"], eos_token_ids=end_of_turn_ids(tokenizer))

    base_raw = base_hit = None
    if "base" in p["baselines"]:  # generated by the evaluate_base stage, on the same sample
        if args.base_outputs is None:
            raise PipelineError("evaluate.baselines has base: pass --base-outputs (the evaluate_base stage's file)")
        base_raw, base_hit = read_base_outputs(args.base_outputs, rows)

    model = models.load_trained_model(trained)
    log.info("model: %s (%s on %s, backend %s)", args.model, "LoRA adapter" if trained.is_adapter else "full model",
             cfg["model"], backend)
    started = time.perf_counter()
    raw, hit = generation.generate_sharded(model, tokenizer, prompts, sources, desc="fine-tuned", **gen)
    if not distributed.is_main():
        return
    log.info("fine-tuned: %d sentences in %.0f s", len(rows), time.perf_counter() - started)
    systems["model"], hits["model"] = postprocess(raw, opencc), list(hit)
    if base_raw is not None:
        systems["base"], hits["base"] = postprocess(base_raw, opencc), list(base_hit)
    if "copy" in p["baselines"]:
        systems["copy"] = list(sources)  # already through the clean stage

    scores, limits = group_scores(systems, references, hits, chapter, p["bootstrap_resamples"])
    csv_rows = score_rows(scores, limits, len(chapter))
    unseen_scores = unseen_metrics = None
    if unseen:
        unseen_scores, unseen_limits = group_scores(systems, references, hits, unseen, p["bootstrap_resamples"])
        csv_rows += score_rows(unseen_scores, unseen_limits, len(unseen), f"@{UNSEEN}")
        unseen_metrics = (unseen_scores, len(unseen), unseen_books)
    metrics = metrics_json(scores, limits, len(chapter), p["baselines"], unseen_metrics)
    for name, s in scores.items():
        u = unseen_scores[name] if unseen_scores else None
        log.info("%-5s BLEU %6.2f  chrF %6.2f%s", name, s["bleu"], s["chrf"],
                 f"   unseen books: BLEU {u['bleu']:6.2f}  chrF {u['chrf']:6.2f}" if u else "")

    book_rows = breakdown([str(r.get("book", "")) for r in rows], references, systems)
    order = [length_bucket(b, p["length_buckets"]) for b in [*p["length_buckets"], p["length_buckets"][-1] + 1]]
    length_rows = breakdown([length_bucket(len(s), p["length_buckets"]) for s in sources], references, systems, order)
    chrf = {name: sentence_chrf(hyps, references) for name, hyps in systems.items() if name != "copy"}
    corpus = f"Corpus BLEU {metrics['bleu']:.2f}, chrF {metrics['chrf']:.2f}"
    if unseen:
        corpus += (f" on the {len(chapter)} sentences of the chapter test; on the {len(unseen)} of unseen books "
                   f"({', '.join(unseen_books)}) BLEU {metrics[UNSEEN]['bleu']:.2f}, chrF {metrics[UNSEEN]['chrf']:.2f}")
    header = (
        f"{len(rows)} of {len(all_rows)} test sentences (evaluate.num_samples={p['num_samples']}, seed={p['seed']}); "
        f"model `{args.model}` on `{cfg['model']}`; num_beams={p['num_beams']}; outputs after the clean "
        f"stage's normalisation and OpenCC. Sentence chrF: sacrebleu `sentence_chrf`. {corpus}."
    )
    samples = render_samples(rows, systems, chrf, pick_examples(chrf["model"], p["num_examples"]), header)

    hypothesis_rows = hypotheses_with_provenance(rows, systems, chrf)

    # the six outputs change together or not at all (a failure while writing leaves the last good ones)
    outputs = [args.hypotheses, *(args.out_dir / name for name in OUT_DIR_FILES), args.metrics]
    with atomic_outputs(*outputs) as (hypotheses_tmp, book_tmp, length_tmp, scores_tmp, samples_tmp, metrics_tmp):
        write_jsonl(hypotheses_tmp, hypothesis_rows)
        write_text(book_tmp, to_csv("book", book_rows))
        write_text(length_tmp, to_csv("length", length_rows))
        write_text(scores_tmp, to_csv("system", csv_rows))
        write_text(samples_tmp, samples)
        write_json(metrics_tmp, metrics)
    log.info("wrote %s, %s/{by_book.csv,by_length.csv,scores.csv,samples.md}, %s", args.metrics, args.out_dir,
             args.hypotheses)


if __name__ == "__main__":
    run_main(with_path_errors(main))
