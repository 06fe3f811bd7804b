"""Benchmark: the evaluate stage's batched generation against one sentence at a time (the notebook's way).

    PYTHONPATH=. .venv/bin/python benchmarks/generation.py            # SmolLM2-135M-Instruct, 64 sentences
    PYTHONPATH=. .venv/bin/python benchmarks/generation.py --model models/adapter --test data/format/test.jsonl
      -> reports/benchmarks/generation.json and generation.md

Same model, same sentences, same prompts (params.yaml format: system prompt + user template), same
greedy decoding, same end-of-turn stop and the same per-sentence budget (evaluate.max_new_tokens_factor
x source tokens + extra). The only difference is the batching:
  ours           stages.evaluate.generate: sorted by length, left-padded batches of evaluate.batch_size
  one at a time  apply_chat_template -> generate -> decode, one sentence per call
The sentences are a fixed sample of the committed corpus (data/corpus/...), hashed by path and line,
so the benchmark needs no pipeline output; --test takes them from a test.jsonl instead.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import yaml

from stages import clean, evaluate, modeling
from stages.common import PipelineError, read_jsonl, write_json, write_text

CORPUS = Path("data/corpus/classical-modern/双语数据")


def corpus_sentences(n: int, opencc: str) -> list[dict]:
    """n (source, target) lines of the committed corpus with the smallest hash of (file, line)."""
    converter = clean.make_converter(opencc)
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
        for row, text in zip(rows, clean.normalise_lines([r[side] for r in rows], converter)):
            row[side] = text
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a train.model spec (default: params.yaml train.model) "
                        "or a directory written by the train stage (models/adapter)")
    parser.add_argument("--test", type=Path, default=None, help="take the sentences from this test.jsonl")
    parser.add_argument("--n", type=int, default=64, help="sentences")
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml evaluate.batch_size")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/generation"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)

    import torch

    params = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    ev = evaluate.check_evaluate_params(params.get("evaluate", {}))
    fmt = params["format"]
    batch_size = args.batch_size or ev["batch_size"]
    spec = args.model or params["train"]["model"]

    if args.test:
        rows = evaluate.select_rows(read_jsonl(args.test), args.n, ev["seed"])
        prompts = [r["messages"][:-1] for r in rows]
    else:
        rows = corpus_sentences(args.n, params.get("clean", {}).get("opencc", "t2s"))
        prompts = [[{"role": "system", "content": fmt["system_prompt"]},
                    {"role": "user", "content": fmt["user_template"].format(classical=r["source"])}] for r in rows]
    sources = [r["source"] for r in rows]

    if Path(spec).is_dir() and (Path(spec) / "training_config.json").is_file():
        cfg = evaluate.read_training_config(Path(spec))
        tokenizer = evaluate.load_tokenizer(Path(spec))
        model, _ = evaluate.load_finetuned(Path(spec), cfg, tokenizer, evaluate.pick_backend(cfg))
    else:
        tokenizer = modeling.load_tokenizer(spec)
        tokenizer.padding_side = "left"
        model = modeling.load_model(spec, device="cuda" if torch.cuda.is_available() else "cpu").eval()
    eos_ids = evaluate.end_of_turn_ids(tokenizer)
    factor, extra = ev["max_new_tokens_factor"], ev["max_new_tokens_extra"]
    budgets = [math.ceil(factor * len(tokenizer(s, add_special_tokens=False).input_ids)) + extra for s in sources]

    evaluate.generate(model, tokenizer, prompts[:2], sources[:2], batch_size=2, factor=factor, extra=1,
                      eos_token_ids=eos_ids, desc="warm-up")
    results = {}
    load = {"start": loadavg()}
    started = time.perf_counter()
    ours, _ = evaluate.generate(model, tokenizer, prompts, sources, batch_size=batch_size, factor=factor,
                                extra=extra, eos_token_ids=eos_ids, desc=f"batched ({batch_size})")
    results["batched"] = time.perf_counter() - started
    load["after_batched"] = loadavg()
    started = time.perf_counter()
    single = one_at_a_time(model, tokenizer, prompts, budgets, eos_ids)
    results["one_at_a_time"] = time.perf_counter() - started
    load["end"] = loadavg()

    def summary(seconds, texts):
        tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
        return {"seconds": round(seconds, 1), "sentences_per_s": round(len(texts) / seconds, 3),
                "output_tokens": tokens, "output_tokens_per_s": round(tokens / seconds, 1)}

    report = {
        "command": " ".join(["PYTHONPATH=. python benchmarks/generation.py", *map(shlex.quote, argv or sys.argv[1:])]),
        "model": spec,
        "sentences": len(rows),
        "source": str(args.test) if args.test else f"{CORPUS} (fixed hash sample)",
        "decoding": {"greedy": True, "max_new_tokens": f"ceil({factor} x source tokens) + {extra}",
                     "budget_tokens_total": sum(budgets)},
        "batched": {"batch_size": batch_size, **summary(results["batched"], ours)},
        "one_at_a_time": summary(results["one_at_a_time"], single),
        "speedup": round(results["one_at_a_time"] / results["batched"], 2),
        "identical_outputs": sum(a == b for a, b in zip(ours, single)),
        "machine": machine_info(),
        "loadavg_1min": load,
    }
    write_json(args.out.with_suffix(".json"), report)
    write_text(args.out.with_suffix(".md"), render(report))
    print(render(report))


def render(report: dict) -> str:
    b, s, m, load, n = report["batched"], report["one_at_a_time"], report["machine"], report["loadavg_1min"], report["sentences"]
    same = f"Identical outputs: {report['identical_outputs']}/{n}" + (
        "." if report["identical_outputs"] == n else " (the rest differ by float rounding with padding in the batch)."
    )
    return "\n".join([
        "# Generation benchmark: batched vs one sentence at a time",
        "",
        f"`{report['command']}`",
        "",
        f"Model `{report['model']}`, {n} sentences ({report['source']}), greedy, budget "
        f"{report['decoding']['max_new_tokens']} tokens, stop at the end-of-turn token.",
        "",
        "| | sentences/s | output tokens/s | seconds |",
        "|---|---:|---:|---:|",
        f"| batched, batch {b['batch_size']} (stages/evaluate.py) | {b['sentences_per_s']:.3f} | {b['output_tokens_per_s']:.1f} | {b['seconds']:.1f} |",
        f"| one at a time (the notebook's loop) | {s['sentences_per_s']:.3f} | {s['output_tokens_per_s']:.1f} | {s['seconds']:.1f} |",
        "",
        f"**Speed-up: {report['speedup']:.2f}x.** {same}",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads, GPU: {m['gpu']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; {m['platform']}.",
        f"1-minute load average {load['start']} at the start and {load['end']} at the end: the benchmark itself "
        f"keeps {m['torch_threads']} threads busy, more means other processes shared the CPUs. Both ways ran "
        "one after the other in the same process: compare the two rows, not separate runs.",
        "",
    ])


if __name__ == "__main__":
    from stages.common import run_main

    run_main(main)
