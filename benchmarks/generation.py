"""Benchmark: the evaluate stage's generation against transformers' batched generate() and against one
sentence at a time (the notebook's way).

    PYTHONPATH=. .venv/bin/python benchmarks/generation.py            # SmolLM2-135M-Instruct, 64 sentences
    PYTHONPATH=. .venv/bin/python benchmarks/generation.py --model smollm2-135m-instruct --model models/adapter
    PYTHONPATH=. .venv/bin/python benchmarks/generation.py --model models/adapter --test data/format/test.jsonl
      -> reports/benchmarks/generation.json and generation.md

Same model, same sentences, same prompts (params.yaml format: system prompt + user template), same
greedy decoding, same end-of-turn stop and the same per-sentence budget (evaluate.max_new_tokens_factor
x source tokens + extra). What differs is how the sentences are run:
  stage          wenyan.generation.generate: sorted by length, batches of evaluate.batch_size; on CPU its
                 own greedy loop (the shared prompt prefix computed once, finished rows leave the batch)
  hf batched     the same batches through transformers' generate() (the stage's way before; beam search
                 and GPU still use it)
  one at a time  apply_chat_template -> generate -> decode, one sentence per call
The sentences are a fixed sample of the committed corpus (data/corpus/...), hashed by path and line,
so the benchmark needs no pipeline output; --test takes them from a test.jsonl instead. Each --model
(a train.model spec, or a directory the train stage wrote) gets its own table: the base model rambles
to its budget, a fine-tuned one ends its turn, and the stage's loop gains most on the latter.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import yaml

from wenyan import generation, metrics, models, text
from wenyan.prompt import end_of_turn_ids, token_budgets
from stages import evaluate
from wenyan.errors import PipelineError
from wenyan.files import read_jsonl, write_json, write_text

CORPUS = Path("data/corpus/classical-modern/双语数据")


def corpus_sentences(n: int, opencc: str) -> list[dict]:
    """n (source, target) lines of the committed corpus with the smallest hash of (file, line)."""
    converter = text.make_converter(opencc)
    rows = []
    for source_file in sorted(CORPUS.rglob("source.txt")):
        target_file = source_file.with_name("target.txt")
        sources = source_file.read_text(encoding="utf-8").splitlines()
        targets = target_file.read_text(encoding="utf-8").splitlines()
        chapter = str(source_file.parent.relative_to(CORPUS))
        for i, (s, t) in enumerate(zip(sources, targets), 1):
            s, t = s.strip(), t.strip()
            if 2 <= len(s) <= 200 and t:
                key = hashlib.sha1(f"{chapter}:{i}".encode()).hexdigest()
                rows.append((key, {"id": f"{chapter}:{i}", "source": s, "target": t}))
    if not rows:
        raise PipelineError(f"{CORPUS}: no source.txt/target.txt pairs found")
    rows = [row for _, row in sorted(rows)[:n]]
    for side in ("source", "target"):  # what the clean stage does to them
        for row, normalised in zip(rows, text.normalise_lines([r[side] for r in rows], converter)):
            row[side] = normalised
    return rows


def one_at_a_time(model, tokenizer, prompts, budgets, eos_ids):
    """The notebook's loop: one prompt, one generate call, decode what follows the prompt."""
    import torch

    outputs = []
    with torch.inference_mode():
        for messages, budget in zip(prompts, budgets):
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(model.device)
            out = model.generate(**inputs, max_new_tokens=budget, do_sample=False, eos_token_id=eos_ids,
                                 pad_token_id=tokenizer.pad_token_id)
            new = out[0, inputs["input_ids"].shape[1]:].tolist()
            new = new[: next((k for k, t in enumerate(new) if t in eos_ids), len(new))]
            outputs.append(tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd"))
    return outputs


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def load_model(spec: str):
    """(model, tokenizer) of a train.model spec, or of a directory written by the train stage."""
    import torch

    if Path(spec).is_dir() and (Path(spec) / "training_config.json").is_file():
        trained = models.load_trained(Path(spec))
        return trained.model, trained.tokenizer
    tokenizer = models.load_tokenizer(spec)
    tokenizer.padding_side = "left"
    return models.load_model(spec, device="cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def bench(spec: str, prompts, sources, ev: dict, batch_size: int) -> dict:
    """The three ways on one model, one after the other in this process; outputs compared to one at a time."""
    model, tokenizer = load_model(spec)
    eos_ids = end_of_turn_ids(tokenizer)
    factor, extra = ev["max_new_tokens_factor"], ev["max_new_tokens_extra"]
    budgets = token_budgets(tokenizer, sources, factor, extra)
    gen = dict(batch_size=batch_size, factor=factor, extra=extra, eos_token_ids=eos_ids)
    for loop in ("own", "hf"):  # warm-up
        generation.generate(model, tokenizer, prompts[:2], sources[:2], **{**gen, "batch_size": 2, "extra": 1},
                          desc="warm-up", loop=loop)
    seconds, texts, load = {}, {}, {"start": loadavg()}
    for name, run in (
        ("stage", lambda: generation.generate(model, tokenizer, prompts, sources, **gen, desc=f"stage ({batch_size})")[0]),
        ("hf_batched", lambda: generation.generate(model, tokenizer, prompts, sources, **gen, loop="hf",
                                                 desc=f"hf generate ({batch_size})")[0]),
        ("one_at_a_time", lambda: one_at_a_time(model, tokenizer, prompts, budgets, eos_ids)),
    ):
        started = time.perf_counter()
        texts[name] = run()
        seconds[name] = time.perf_counter() - started
        load[f"after_{name}"] = loadavg()

    def summary(name):
        tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts[name])
        return {"seconds": round(seconds[name], 1), "sentences_per_s": round(len(texts[name]) / seconds[name], 3),
                "output_tokens": tokens, "output_tokens_per_s": round(tokens / seconds[name], 1),
                "speedup_vs_one_at_a_time": round(seconds["one_at_a_time"] / seconds[name], 2),
                "identical_to_one_at_a_time": sum(a == b for a, b in zip(texts[name], texts["one_at_a_time"]))}

    del model
    return {"model": spec, "budget_tokens_total": sum(budgets), **{name: summary(name) for name in seconds},
            "stage_vs_hf_batched": round(seconds["hf_batched"] / seconds["stage"], 2), "loadavg_1min": load}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="a train.model spec or a directory written by the train stage (models/adapter); "
                        "repeat for several (default: params.yaml train.model)")
    parser.add_argument("--test", type=Path, default=None, help="take the sentences from this test.jsonl")
    parser.add_argument("--n", type=int, default=64, help="sentences")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml evaluate.batch_size")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/generation"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)

    params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    ev = evaluate.check_evaluate_params(params.get("evaluate", {}))
    fmt = params["format"]
    batch_size = args.batch_size or ev["batch_size"]
    specs = args.model or [params["train"]["model"]]

    if args.test:
        rows = metrics.select_rows(read_jsonl(args.test), args.n, ev["seed"])
        prompts = [r["messages"][:-1] for r in rows]
    else:
        rows = corpus_sentences(args.n, params.get("clean", {}).get("opencc", "t2s"))
        prompts = [[{"role": "system", "content": fmt["system_prompt"]},
                    {"role": "user", "content": fmt["user_template"].format(classical=r["source"])}] for r in rows]
    sources = [r["source"] for r in rows]

    report = {
        "command": " ".join(["PYTHONPATH=. python benchmarks/generation.py", *map(shlex.quote, argv or sys.argv[1:])]),
        "sentences": len(rows),
        "source": str(args.test) if args.test else f"{CORPUS} (fixed hash sample)",
        "decoding": {"greedy": True, "max_new_tokens": f"ceil({ev['max_new_tokens_factor']} x source tokens) + "
                     f"{ev['max_new_tokens_extra']}", "batch_size": batch_size},
        "runs": [bench(spec, prompts, sources, ev, batch_size) for spec in specs],
        "machine": machine_info(),
    }
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), render(report))
    print(render(report))


def render(report: dict) -> str:
    m, n, bs = report["machine"], report["sentences"], report["decoding"]["batch_size"]
    out = [
        "# Generation benchmark: the evaluate stage vs transformers' generate(), batched and one at a time",
        "",
        f"`{report['command']}`",
        "",
        f"{n} sentences ({report['source']}), greedy, budget {report['decoding']['max_new_tokens']} tokens, stop at "
        "the end-of-turn token. The three ways ran one after the other in one process: compare rows of one table.",
    ]
    names = {"stage": f"stage: own greedy loop, batch {bs} (stages/evaluate.py)",
             "hf_batched": f"transformers generate(), batch {bs} (the stage before)",
             "one_at_a_time": "one at a time (the notebook's loop)"}
    for run in report["runs"]:
        load = run["loadavg_1min"]
        out += ["", f"## `{run['model']}`", "",
                "| | sentences/s | output tokens/s | seconds | speed-up | identical outputs |",
                "|---|---:|---:|---:|---:|---:|"]
        for key, label in names.items():
            r = run[key]
            out.append(f"| {label} | {r['sentences_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | {r['seconds']:.1f} | "
                       f"{r['speedup_vs_one_at_a_time']:.2f}x | {r['identical_to_one_at_a_time']}/{n} |")
        out += ["", f"**Stage vs transformers' batched generate(): {run['stage_vs_hf_batched']:.2f}x; vs one at a time: "
                f"{run['stage']['speedup_vs_one_at_a_time']:.2f}x.** Output tokens {run['one_at_a_time']['output_tokens']} "
                f"of a budget of {run['budget_tokens_total']}. 1-minute load average: "
                + ", ".join(f"{k} {v}" for k, v in load.items()) + "."]
    out += [
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, GPU: {m['gpu']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; {m['platform']}. "
        f"The benchmark keeps {m['torch_threads']} threads busy: a load average above that means other processes "
        "shared the CPUs.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    from wenyan.errors import run_main

    run_main(main)
