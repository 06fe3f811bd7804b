"""Evaluate_base: the base model's outputs on the sentences evaluate scores, for evaluate's `base` baseline.

    data/format/test.jsonl + models/base (stage base)
      -> data/evaluate/base_outputs.jsonl   {id, output, hit_limit} per evaluated sentence (raw: evaluate normalises)

Run it:  dvc repro evaluate_base
   or:   python -m stages.evaluate_base --test data/format/test.jsonl --base models/base \
             --out data/evaluate/base_outputs.jsonl [--params params.yaml]

These outputs depend only on the base model, the test sample, the prompt and the generation settings, never on
the fine-tuned model, so they are a stage of their own that DVC skips (or restores from its run cache) while only
train.* params change. The sample (wenyan.metrics.select_evaluated: the chapter test and the unseen books, each
sampled), prompts, generation and several GPUs (evaluate.num_gpus) are those of the evaluate stage; without `base`
in evaluate.baselines it writes an empty file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from wenyan import distributed, generation, models
from wenyan.errors import PipelineError, get_logger, run_main
from wenyan.files import check_output_path, check_paths, read_jsonl, with_path_errors, write_jsonl
from wenyan.metrics import EVALUATE_SCHEMA, check_test_rows, select_evaluated
from wenyan.params import add_params_options, check_params, load_sections
from wenyan.prompt import end_of_turn_ids

log = get_logger("evaluate_base")

# The keys of params.yaml's evaluate: section that decide which sentences the base model translates, and how.
BASE_KEYS = ("num_samples", "seed", "num_beams", "max_new_tokens_factor", "max_new_tokens_extra", "baselines", "batch_size",
             "num_gpus")


def base_tokenizer(model: str, chat_template: str | None):
    """The tokenizer train's hf path builds (the model's own, or train.chat_template), left padding."""
    tokenizer = models.load_tokenizer(model, chat_template)
    tokenizer.padding_side = "left"
    return tokenizer


def base_location(base: Path) -> dict:
    """The model models/base/base.json points at (where train.model resolved to), when it lies elsewhere."""
    try:
        info = json.loads((base / "base.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    location = info.get("location") if isinstance(info, dict) else None
    return {"--base's base.json location": Path(location)} if isinstance(location, str) and Path(location).exists() else {}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test", required=True, type=Path, help="data/format/test.jsonl")
    parser.add_argument("--base", required=True, type=Path, help="models/base (written by the base stage)")
    parser.add_argument("--out", required=True, type=Path, help="data/evaluate/base_outputs.jsonl")
    add_params_options(parser)
    args = parser.parse_args(argv)
    check_output_path(args.out)  # before the model runs, not after
    inputs = {"--test": args.test, "--base": args.base, "--params": args.params, **base_location(args.base)}
    check_paths(inputs, {"--out": args.out}, dirs=["--base", *base_location(args.base)])  # nor onto the model base.json points at
    names = [f"evaluate.{k}" for k in BASE_KEYS] + ["train.model", "train.chat_template", "train.backend"]
    params = load_sections("evaluate_base", names, args.params)
    p = check_params({k: params["evaluate"][k] for k in BASE_KEYS}, {k: EVALUATE_SCHEMA[k] for k in BASE_KEYS}, "evaluate")
    if args.check_params:
        return
    train = params["train"]
    argv = sys.argv[1:] if argv is None else list(argv)
    if "base" in p["baselines"] and distributed.relaunched("stages.evaluate_base", "evaluate.num_gpus", p["num_gpus"], argv,
                                                           quiet=[log, models.log, generation.log]):
        return
    if not (args.base / "base.json").is_file():
        raise PipelineError(f"{args.base}/base.json: not found; run the base stage first (dvc repro base)")
    rows = []
    if "base" in p["baselines"]:
        all_rows, lines = read_jsonl(args.test, with_lines=True)
        check_test_rows(all_rows, args.test, lines)
        rows = select_evaluated(all_rows, p["num_samples"], p["seed"])
    out_rows = []
    if rows:
        tokenizer = base_tokenizer(train["model"], train["chat_template"])
        model = models.load_base({"model": train["model"]}, tokenizer)  # plain transformers (models.inference_backend)
        started = time.perf_counter()
        raw, hit = generation.generate_sharded(
            model, tokenizer, [r["messages"][:-1] for r in rows], [r["source"] for r in rows], desc="base",
            batch_size=p["batch_size"], num_beams=p["num_beams"], factor=p["max_new_tokens_factor"],
            extra=p["max_new_tokens_extra"], eos_token_ids=end_of_turn_ids(tokenizer),
        )
        log.info("base: %d sentences in %.0f s", len(rows), time.perf_counter() - started)
        out_rows = [{"id": r.get("id"), "output": text_, "hit_limit": h} for r, text_, h in zip(rows, raw, hit)]
    if not distributed.is_main():
        return
    write_jsonl(args.out, out_rows)  # raw outputs: evaluate gives them the references' normalisation
    log.info("wrote %d base outputs to %s", len(out_rows), args.out)


if __name__ == "__main__":
    run_main(with_path_errors(main))
