"""Benchmark the train stage's two backends on one GPU: unsloth vs hf (transformers + peft + trl), each with
LoRA on a 16-bit base and QLoRA on a 4-bit base; same GPU, model, data, batch and seed.

    python benchmarks/train_backends.py --train data/format/train.jsonl --out reports/benchmarks/train_backends
    # options: --model smollm2-135m-instruct --steps 40 --warmup-steps 10 --batch-tokens 32768
    #          --configs unsloth-lora,hf-lora,unsloth-qlora,hf-qlora   (also: unsloth-lora-padfree, unsloth-full, hf-full)

Each config runs `stages.train.train` in a fresh Python process (this script with --one CONFIG), so unsloth's
patching of transformers/peft/trl never reaches the hf runs. Measured after --warmup-steps (compilation,
autotuning): trained non-pad tokens/s (every real token of the batch), completion tokens/s (reply tokens,
the ones with a loss), and peak GPU memory (torch.cuda.max_memory_allocated). Writes results.json and
results.md to --out. Other settings come from params.yaml's train: section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = {
    "unsloth-lora": {"backend": "unsloth", "method": "lora", "load_in_4bit": False},
    "hf-lora": {"backend": "hf", "method": "lora", "load_in_4bit": False},
    "unsloth-qlora": {"backend": "unsloth", "method": "qlora", "load_in_4bit": True},
    "hf-qlora": {"backend": "hf", "method": "qlora", "load_in_4bit": True},
    "unsloth-lora-padfree": {"backend": "unsloth", "method": "lora", "load_in_4bit": False, "padding_free": True},
    "unsloth-full": {"backend": "unsloth", "method": "full", "load_in_4bit": False},
    "hf-full": {"backend": "hf", "method": "full", "load_in_4bit": False},
}
DEFAULT_CONFIGS = "unsloth-lora,hf-lora,unsloth-qlora,hf-qlora"


def run_one(name: str, args) -> dict:
    """In the child process: one training run, measured after the warm-up steps."""
    from stages import train as train_stage  # imports no transformers/trl: unsloth (if used) still comes first
    from wenyan.params import load_sections

    params = load_sections("train", ["train", "format", "clean.opencc"], args.params)
    section = dict(params["train"])
    section.update(CONFIGS[name])
    section.update(
        model=args.model or section["model"], max_steps=args.steps, logging_steps=1, eval_steps=0, save_steps=0,
        resume=False, batch_tokens=args.batch_tokens, max_train_samples=args.rows, warmup_steps=min(5, args.steps),
    )
    if args.batch_rows:
        section.update(batch_tokens=0, batch_size=args.batch_rows)
    if args.gradient_checkpointing != "auto":
        section["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    cfg = train_stage.resolve_config(section)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        tmp = Path(tmp)
        summary = train_stage.train(cfg, args.train, None, tmp / "out", tmp / "checkpoints", tmp / "reports",
                                    prompt=train_stage.resolve_prompt(params["format"], params["clean"]["opencc"]))
    history = [h for h in summary["history"] if "tokens" in h]
    if len(history) <= args.warmup_steps + 1:
        raise SystemExit(f"{name}: only {len(history)} logged steps; raise --steps above --warmup-steps")
    first, last = history[args.warmup_steps], history[-1]
    seconds = last["train_seconds"] - first["train_seconds"]
    import torch
    import transformers
    import trl

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    for package in ("peft", "unsloth", "bitsandbytes"):
        try:
            versions[package] = __import__(package).__version__
        except Exception:
            pass
    return {
        "config": name,
        **{k: v for k, v in CONFIGS[name].items() if k != "padding_free"},
        "device": summary["device"],
        "dtype": summary["dtype"],
        "padding_free": summary["padding_free"],
        "gradient_checkpointing": summary["gradient_checkpointing"],
        "rows_per_batch": summary["rows_per_batch"],
        "mean_example_tokens": summary["mean_example_tokens"],
        "measured_steps": last["step"] - first["step"],
        "tokens_per_s": round((last["tokens"] - first["tokens"]) / seconds, 1),
        "completion_tokens_per_s": round((last["completion_tokens"] - first["completion_tokens"]) / seconds, 1),
        "seconds_per_step": round(seconds / (last["step"] - first["step"]), 4),
        "peak_memory_mib": summary["peak_memory_mib"],
        "trainable_params": summary["trainable_params"],
        "final_train_loss": summary["final_train_loss"],
        "versions": versions,
    }


def markdown(results: list[dict], args) -> str:
    ok = [r for r in results if "error" not in r]
    lines = [
        "# Train backends: unsloth vs hf",
        "",
        f"Model `{args.model or 'params.yaml train.model'}`, data `{args.train}`"
        + (f" (first {args.rows} rows)" if args.rows else "")
        + f", {args.steps} steps, throughput over the steps after the first {args.warmup_steps}.",
        f"Device: {ok[0]['device'] if ok else '?'}; versions: "
        + (", ".join(f"{k} {v}" for k, v in ok[0]["versions"].items()) if ok else "?"),
        "",
        "| config | backend | method | rows/batch | padding-free | grad. ckpt | tokens/s | completion tokens/s | s/step | peak GPU MiB | final loss |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error'][:120]} |||||||||| ")
            continue
        lines.append(
            f"| {r['config']} | {r['backend']} | {r['method']} | {r['rows_per_batch']} | {r['padding_free']} | "
            f"{r['gradient_checkpointing']} | {r['tokens_per_s']:,.0f} | {r['completion_tokens_per_s']:,.0f} | "
            f"{r['seconds_per_step']:.3f} | {r['peak_memory_mib']:,.0f} | {r['final_train_loss']:.4f} |"
        )
    lines += ["", "tokens/s counts every real (non-pad) token trained; completion tokens are the reply tokens with a loss.",
              "Peak memory: torch.cuda.max_memory_allocated over training.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="formatted training JSONL (data/format/train.jsonl)")
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="params.yaml whose train: section is the base")
    parser.add_argument("--model", help="train.model to benchmark (default: params.yaml)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps excluded from the throughput")
    parser.add_argument("--batch-tokens", type=int, default=32768, help="tokens a micro-batch (rows = this / mean length)")
    parser.add_argument("--batch-rows", type=int, default=0, help="fixed rows a micro-batch instead of --batch-tokens")
    parser.add_argument("--rows", type=int, default=0, help="use the first N training rows (0 = all)")
    parser.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="auto = each backend's default (unsloth's offloaded checkpointing; none for hf)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per config")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one config, print its JSON
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        result = run_one(args.one, args)
        Path(args.result).write_text(json.dumps(result, indent=2))
        return

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        result_file = out / f"{name}.json"
        result_file.unlink(missing_ok=True)
        child = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--result", str(result_file)]
        child += [a for a in (argv if argv is not None else sys.argv[1:])]
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log_file:
            try:
                proc = subprocess.run(child, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, timeout=args.timeout,
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc == 0 and result_file.is_file():
            result = json.loads(result_file.read_text())
            result["wall_s"] = round(time.perf_counter() - start, 1)
            print(f"   {result['tokens_per_s']:,.0f} tokens/s, {result['peak_memory_mib']:,.0f} MiB peak", flush=True)
        else:
            tail = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            result = {"config": name, **CONFIGS[name], "error": f"exit {rc}: {tail[0]}"}
            print(f"   failed ({rc}); see {out / (name + '.log')}", flush=True)
        results.append(result)
        (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(results, args), encoding="utf-8")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
