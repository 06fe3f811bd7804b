"""Evaluate: translate test sentences with the fine-tuned model and score them against the references.

    data/format/test.jsonl + models/adapter + data/evaluate/base_outputs.jsonl (stage evaluate_base, below)
      -> reports/metrics.json            BLEU (tokenize=zh) with a bootstrap 95% CI, chrF, signatures, baselines
      -> reports/evaluate/by_book.csv    BLEU/chrF per book, model and baselines
      -> reports/evaluate/by_length.csv  BLEU/chrF per source-length bucket (characters)
      -> reports/evaluate/samples.md     best, worst and a spread of outputs by sentence chrF
      -> data/evaluate/hypotheses.jsonl  every output with its provenance (id, book, chapter, line)

Run it:  dvc repro evaluate
   or:   python -m stages.evaluate --test data/format/test.jsonl --model models/adapter \
             --metrics reports/metrics.json --out-dir reports/evaluate \
             --hypotheses data/evaluate/hypotheses.jsonl \
             [--base-outputs data/evaluate/base_outputs.jsonl] [--params params.yaml]

The prompt of a test row is messages[:-1] (system + user, as in training); the reference is `target`.
Outputs get the references' treatment before scoring: stages/text.py's normalisation and the OpenCC
conversion the model was trained with (its training_config.json `prompt.opencc`, recorded by train).

Baselines (params evaluate.baselines) are scored on the same sentences:
  copy  the classical source unchanged (how far modern Chinese is from the classical text)
  base  the model before fine-tuning (train.model, loaded on its own), same prompts
The base baseline's outputs depend only on the base model, the sample, the prompt and the generation
settings, never on the fine-tuned model: they come from the stage evaluate_base (this module too), which
DVC skips while only train.* params change, and restores from its run cache when they change back:

    python -m stages.evaluate base --test data/format/test.jsonl --base models/base \
        --out data/evaluate/base_outputs.jsonl

Generation is stages/modeling.py's generate(): batched with left padding, greedy unless
evaluate.num_beams > 1, stops at the end-of-turn token, each sentence cut at its own budget
(max_new_tokens = factor x source tokens + extra); on CPU greedy decoding runs modeling.greedy_batch
(reports/benchmarks/generation.md).

Several GPUs (evaluate.num_gpus > 1, both stages): the command starts itself again under torchrun, one
process per GPU (stages/distributed.py, as train.num_gpus does); each process generates every
num_gpus-th batch of the length-sorted sentences, the outputs are gathered in their original order and
rank 0 alone scores and writes, so the reports are byte for byte those of one process
(tests/test_evaluate_ddp.py: two gloo processes on CPU). `torchrun --nproc_per_node N -m stages.evaluate ...`
by hand works too.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import time
from pathlib import Path

from stages import distributed, modeling, text
from wenyan import artifacts
from wenyan.relations import check_paths
from stages.common import (
    PipelineError,
    atomic_outputs,
    check_output_path,
    Float,
    Int,
    ListOf,
    check_params,
    get_logger,
    load_params,
    load_sections,
    read_jsonl,
    run_main,
    write_json,
    write_jsonl,
    write_text,
)

log = get_logger("evaluate")

SCHEMA = {  # values and their comments: params.yaml
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
OUT_DIR_FILES = ("by_book.csv", "by_length.csv", "samples.md")  # what evaluate writes into --out-dir


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


def check_rows(rows: list[dict], path, lines: list[int] | None = None) -> None:
    """The format stage's schema (wenyan.artifacts.TEST_ROW): an id of its own, source and target strings, and messages
    ending with the user's turn and the assistant's reference; a bad row is one error naming its line and field."""
    if not rows:
        raise PipelineError(f"{path}: no test rows")
    artifacts.check_rows(rows, artifacts.TEST_ROW, path, "rewrite it with the format stage (dvc repro format)",
                         unique="id", lines=lines)


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


def postprocess(texts: list[str], opencc_config: str | None) -> list[str]:
    """What the references went through in the clean stage: its normalisation (NFC, control characters,
    whitespace, full-width punctuation) and OpenCC conversion with the model's recorded config ('none' = none)."""
    return text.normalise_lines(list(texts), text.make_converter(opencc_config))


# ----------------------------------------------------------------------------------------------
# Several GPUs (evaluate.num_gpus): the same command under torchrun, one process per GPU; each generates its
# shard (modeling.generate's `shard`: whole batches of the length-sorted sentences, dealt out in turn), the
# outputs are gathered in their original order (distributed.gather_shards) and rank 0 alone scores and writes,
# so the reports are those of one process.


def relaunched(num_gpus: int, argv: list[str]) -> bool:
    """evaluate.num_gpus > 1 in a plain process: run this same command under torchrun (True: it is done).
    Under torchrun (launched so, or by hand): join the process group and go on with whatever world size."""
    if num_gpus > 1 and distributed.world()[2] == 1:
        distributed.launch("stages.evaluate", "evaluate.num_gpus", num_gpus, argv)
        return True
    import torch

    distributed.init_distributed(torch.cuda.is_available(), quiet=[log, modeling.log])
    return False


def generate_sharded(model, tokenizer, prompts, sources, **gen) -> tuple[list[str], list[bool]]:
    """modeling.generate over all processes: this one's shard, then everyone's outputs in prompt order."""
    rank, _, processes = distributed.world()
    raw, hit = modeling.generate(model, tokenizer, prompts, sources, shard=(rank, processes), **gen)
    raw, hit = distributed.gather_shards(raw, hit)
    distributed.finish()  # what follows is rank 0's alone
    return raw, hit


# ----------------------------------------------------------------------------------------------
# The base baseline (stage evaluate_base): its outputs depend on the base model, the test sample, the prompt
# and the generation settings, never on the fine-tuned model, so they are a stage of their own that DVC
# skips (or restores from its run cache) while only train.* params change.

BASE_KEYS = ("num_samples", "seed", "num_beams", "max_new_tokens_factor", "max_new_tokens_extra", "baselines", "batch_size",
             "num_gpus")


def base_tokenizer(model: str, chat_template: str | None):
    """The tokenizer train's hf path builds (the model's own, or train.chat_template), left padding."""
    tokenizer = modeling.load_tokenizer(model, chat_template)
    tokenizer.padding_side = "left"
    return tokenizer


def base_main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="evaluate_base: the base model's outputs on the evaluated sample")
    parser.add_argument("--test", required=True, type=Path, help="data/format/test.jsonl")
    parser.add_argument("--base", required=True, type=Path, help="models/base (written by the base stage)")
    parser.add_argument("--out", required=True, type=Path, help="data/evaluate/base_outputs.jsonl")
    parser.add_argument("--params", type=Path, default=None, help="read params.yaml directly instead of through DVC")
    args = parser.parse_args(argv)
    check_output_path(args.out)  # before the model runs, not after
    check_paths({"--test": args.test, "--base": args.base, "--params": args.params}, {"--out": args.out},
                dirs=["--base"])
    names = [f"evaluate.{k}" for k in BASE_KEYS] + ["train.model", "train.chat_template", "train.backend"]
    params = load_sections("evaluate_base", names, args.params)
    p = check_params({k: params["evaluate"][k] for k in BASE_KEYS}, {k: SCHEMA[k] for k in BASE_KEYS}, "evaluate")
    train = params["train"]
    if "base" in p["baselines"] and relaunched(p["num_gpus"], ["base", *(sys.argv[2:] if argv is None else argv)]):
        return
    if not (args.base / "base.json").is_file():
        raise PipelineError(f"{args.base}/base.json: not found; run the base stage first (dvc repro base)")
    rows = []
    if "base" in p["baselines"]:
        all_rows, lines = read_jsonl(args.test, with_lines=True)
        check_rows(all_rows, args.test, lines)
        rows = select_rows(all_rows, p["num_samples"], p["seed"])
    out_rows = []
    if rows:
        backend = modeling.pick_backend("auto" if train["backend"] != "hf" else "hf")
        tokenizer = base_tokenizer(train["model"], train["chat_template"])
        model = modeling.load_base({"model": train["model"]}, tokenizer, backend)
        started = time.perf_counter()
        raw, hit = generate_sharded(
            model, tokenizer, [r["messages"][:-1] for r in rows], [r["source"] for r in rows], desc="base",
            batch_size=p["batch_size"], num_beams=p["num_beams"], factor=p["max_new_tokens_factor"],
            extra=p["max_new_tokens_extra"], eos_token_ids=modeling.end_of_turn_ids(tokenizer),
        )
        log.info("base: %d sentences in %.0f s", len(rows), time.perf_counter() - started)
        out_rows = [{"id": r.get("id"), "output": text_, "hit_limit": h} for r, text_, h in zip(rows, raw, hit)]
    if not distributed.is_main():
        return
    write_jsonl(args.out, out_rows)  # raw outputs: evaluate gives them the references' normalisation
    log.info("wrote %d base outputs to %s", len(out_rows), args.out)


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
# Scores


def score(hypotheses: list[str], references: list[str], n_bootstrap: int = 0) -> dict:
    """Corpus BLEU (tokenize='zh') and chrF, rounded as sacrebleu prints them, with signatures; with
    n_bootstrap >= 2 also BLEU's 95% CI (sacrebleu's bootstrap: mean +- half the 2.5-97.5 percentile
    range of the resampled scores)."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(tokenize="zh"), CHRF()
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


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["base"]:  # python -m stages.evaluate base ...: the evaluate_base stage
        return base_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test", required=True, type=Path, help="data/format/test.jsonl")
    parser.add_argument("--model", required=True, type=Path, help="models/adapter (written by the train stage)")
    parser.add_argument("--metrics", required=True, type=Path, help="reports/metrics.json")
    parser.add_argument("--out-dir", required=True, type=Path, help="reports/evaluate")
    parser.add_argument("--hypotheses", required=True, type=Path, help="data/evaluate/hypotheses.jsonl")
    parser.add_argument("--base-outputs", type=Path, default=None,
                        help="data/evaluate/base_outputs.jsonl: the evaluate_base stage's outputs (needed for baseline base)")
    parser.add_argument("--params", type=Path, default=None, help="read params.yaml directly instead of through DVC")
    args = parser.parse_args(argv)
    for path, directory in ((args.metrics, False), (args.hypotheses, False), (args.out_dir, True)):
        check_output_path(path, directory=directory)  # before the model runs, not after
    check_paths({"--test": args.test, "--model": args.model, "--base-outputs": args.base_outputs, "--params": args.params},
                {"--metrics": args.metrics, "--hypotheses": args.hypotheses,
                 **{f"--out-dir {name}": args.out_dir / name for name in OUT_DIR_FILES}}, dirs=["--model"])

    p = check_evaluate_params(load_params("evaluate", args.params))
    if relaunched(p["num_gpus"], argv):
        return
    all_rows, lines = read_jsonl(args.test, with_lines=True)
    check_rows(all_rows, args.test, lines)
    rows = select_rows(all_rows, p["num_samples"], p["seed"])
    books = sorted({str(r.get("book", "")) for r in rows})
    log.info("scoring %d of %d test sentences (%d books)", len(rows), len(all_rows), len(books))
    trained = modeling.load_trained(args.model, model=False)  # config, prompt, tokenizer: cheap checks first
    cfg, tokenizer, backend = trained.config, trained.tokenizer, trained.backend
    opencc = trained.prompt["opencc"]  # the references' OpenCC conversion, as recorded by train
    text.make_converter(opencc)  # an unknown config fails now, not after generating

    sources = [r["source"] for r in rows]
    references = [r["target"] for r in rows]
    prompts = [r["messages"][:-1] for r in rows]
    systems: dict[str, list[str]] = {}
    limits: dict[str, int] = {}
    gen = dict(batch_size=p["batch_size"], num_beams=p["num_beams"], factor=p["max_new_tokens_factor"],
               extra=p["max_new_tokens_extra"], eos_token_ids=modeling.end_of_turn_ids(tokenizer))

    base_raw = base_hit = None
    if "base" in p["baselines"]:  # generated by the evaluate_base stage, on the same sample
        if args.base_outputs is None:
            raise PipelineError("evaluate.baselines has base: pass --base-outputs (the evaluate_base stage's file)")
        base_raw, base_hit = read_base_outputs(args.base_outputs, rows)

    model = modeling.load_trained_model(trained)
    log.info("model: %s (%s on %s, backend %s)", args.model, "LoRA adapter" if trained.is_adapter else "full model",
             cfg["model"], backend)
    started = time.perf_counter()
    raw, hit = generate_sharded(model, tokenizer, prompts, sources, desc="fine-tuned", **gen)
    if not distributed.is_main():
        return
    log.info("fine-tuned: %d sentences in %.0f s", len(rows), time.perf_counter() - started)
    systems["model"], limits["model"] = postprocess(raw, opencc), sum(hit)
    if base_raw is not None:
        systems["base"], limits["base"] = postprocess(base_raw, opencc), sum(base_hit)
    if "copy" in p["baselines"]:
        systems["copy"] = list(sources)  # already through the clean stage

    scores = {name: score(hyps, references, p["bootstrap_resamples"]) for name, hyps in systems.items()}
    model_scores = scores["model"]
    metrics = {
        "n_sentences": len(rows),
        "bleu": model_scores["bleu"],
        "bleu_ci95": model_scores.get("bleu_ci95"),
        "chrf": model_scores["chrf"],
        "bleu_signature": model_scores["bleu_signature"],
        "chrf_signature": model_scores["chrf_signature"],
        "hit_max_new_tokens": limits["model"],
        "baselines": {
            name: {k: v for k, v in s.items() if not k.endswith("_signature")}
            | ({"hit_max_new_tokens": limits[name]} if name in limits else {})
            for name, s in scores.items()
            if name != "model"
        },
    }
    if metrics["bleu_ci95"] is None:
        del metrics["bleu_ci95"]
    for name, s in scores.items():
        log.info("%-5s BLEU %6.2f  chrF %6.2f", name, s["bleu"], s["chrf"])

    book_rows = breakdown([str(r.get("book", "")) for r in rows], references, systems)
    order = [length_bucket(b, p["length_buckets"]) for b in [*p["length_buckets"], p["length_buckets"][-1] + 1]]
    length_rows = breakdown([length_bucket(len(s), p["length_buckets"]) for s in sources], references, systems, order)
    chrf = {name: sentence_chrf(hyps, references) for name, hyps in systems.items() if name != "copy"}
    header = (
        f"{len(rows)} of {len(all_rows)} test sentences (evaluate.num_samples={p['num_samples']}, seed={p['seed']}); "
        f"model `{args.model}` on `{cfg['model']}`; num_beams={p['num_beams']}; outputs after the clean "
        f"stage's normalisation and OpenCC. Sentence chrF: sacrebleu `sentence_chrf`. "
        f"Corpus BLEU {metrics['bleu']:.2f}, chrF {metrics['chrf']:.2f}."
    )
    samples = render_samples(rows, systems, chrf, pick_examples(chrf["model"], p["num_examples"]), header)

    hypothesis_rows = []
    for i, row in enumerate(rows):
        out = {k: row.get(k) for k in ("id", "book", "chapter", "line")}
        out |= {"source": row["source"], "reference": row["target"], "hypothesis": systems["model"][i],
                "chrf": chrf["model"][i]}
        if "base" in systems:
            out |= {"base": systems["base"][i], "base_chrf": chrf["base"][i]}
        hypothesis_rows.append(out)

    # the five outputs change together or not at all (a failure while writing leaves the last good ones)
    outputs = [args.hypotheses, *(args.out_dir / name for name in OUT_DIR_FILES), args.metrics]
    with atomic_outputs(*outputs) as (hypotheses_tmp, book_tmp, length_tmp, samples_tmp, metrics_tmp):
        write_jsonl(hypotheses_tmp, hypothesis_rows)
        write_text(book_tmp, to_csv("book", book_rows))
        write_text(length_tmp, to_csv("length", length_rows))
        write_text(samples_tmp, samples)
        write_json(metrics_tmp, metrics)
    log.info("wrote %s, %s/{by_book.csv,by_length.csv,samples.md}, %s", args.metrics, args.out_dir, args.hypotheses)


if __name__ == "__main__":
    run_main(main)
