"""Benchmark train.num_gpus: the train stage on 1 GPU against N GPUs (DDP through torchrun), same model,
data, global batch, steps and seed; tokens/s and the final losses side by side.

    python benchmarks/train_ddp.py --train data/format/train.jsonl --valid data/format/valid.jsonl \
        --gpus 1,2 --out reports/benchmarks/train_ddp -S backend=unsloth -S method=full -S max_steps=60
    # -S: any train: parameter (params.yaml's train: section is the base)

Each run is `python -m stages.train ... --params <file with train.num_gpus=N>` in a fresh process, the
command dvc.yaml runs; with N > 1 the stage relaunches itself under torchrun. Reported per run:
- tokens/s over the whole run (exact non-pad token counts summed over the processes / training time,
  compilation and warm-up included) and in steady state (the mean of the logged rates after
  --warmup-steps; under DDP each logged rate is rank 0's share x N);
- the final train loss, the final eval loss (same valid rows), peak GPU memory per GPU, wall time.
Writes <out>.json and <out>.md, with the card's name.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        return []


def steady_rate(reports: Path, warmup_steps: int) -> float | None:
    tsv = reports / "plots" / "metrics" / "train" / "tokens_per_s.tsv"
    if not tsv.is_file():
        return None
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    rates = [float(r["tokens_per_s"]) for r in rows if int(r["step"]) > warmup_steps]
    return round(sum(rates) / len(rates), 1) if rates else None


def run_one(n: int, args, train_params: dict, work: Path) -> dict:
    base = work / f"gpus-{n}"
    base.mkdir(parents=True, exist_ok=True)
    params = {"train": {**train_params, "num_gpus": n}}
    (base / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    cmd = [sys.executable, "-m", "stages.train", "--train", args.train, "--valid", args.valid,
           "--out", str(base / "adapter"), "--checkpoints", str(base / "checkpoints"),
           "--reports", str(base / "reports"), "--params", str(base / "params.yaml")]
    print(f"==> {n} GPU(s): {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    wall = time.time() - start
    if proc.returncode != 0:
        return {"num_gpus": n, "error": f"exit {proc.returncode}", "wall_s": round(wall, 1)}
    s = json.loads((base / "reports" / "summary.json").read_text())
    return {
        "num_gpus": n,
        "processes": s["processes"],
        "backend": s["backend"],
        "method": s["method"],
        "steps": s["steps"],
        "rows_per_batch": s["rows_per_batch"],
        "tokens_seen": s["tokens_seen"],
        "train_time_s": s["train_time_s"],
        "tokens_per_s": s["tokens_per_s"],
        "steady_tokens_per_s": steady_rate(base / "reports", args.warmup_steps),
        "final_train_loss": s["final_train_loss"],
        "final_eval_loss": s["final_eval_loss"],
        "peak_memory_mib_per_gpu": s["peak_memory_mib"],
        "wall_s": round(wall, 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--gpus", default="1,2", help="comma-separated GPU counts, e.g. 1,2")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the steady-state rate")
    parser.add_argument("--out", default="reports/benchmarks/train_ddp")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="a train: parameter")
    args = parser.parse_args(argv)

    train_params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["train"]
    for item in args.set:
        key, _, value = item.partition("=")
        train_params[key.removeprefix("train.")] = yaml.safe_load(value)
    train_params.update(resume=False, save_steps=0)
    counts = [int(x) for x in args.gpus.split(",")]
    with tempfile.TemporaryDirectory(prefix="train_ddp_") as tmp:
        runs = [run_one(n, args, train_params, Path(tmp)) for n in counts]
    result = {
        "what": "train stage, 1 vs N GPUs (DDP via torchrun), same model/data/global batch/steps/seed",
        "command": "python benchmarks/train_ddp.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "gpus": gpu_names(),
        "train_params": {k: train_params[k] for k in ("model", "backend", "method", "batch_tokens", "max_steps",
                                                      "learning_rate", "max_train_samples", "max_seq_length")},
        "runs": runs,
    }
    one = next((r for r in runs if r.get("num_gpus") == 1 and "error" not in r), None)
    for r in runs:
        if one and r is not one and "error" not in r:
            r["speedup_whole_run"] = round(r["tokens_per_s"] / one["tokens_per_s"], 2)
            if r["steady_tokens_per_s"] and one["steady_tokens_per_s"]:
                r["speedup_steady"] = round(r["steady_tokens_per_s"] / one["steady_tokens_per_s"], 2)
            r["eval_loss_diff"] = round(r["final_eval_loss"] - one["final_eval_loss"], 4)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [
        "# Train stage: 1 GPU vs several (DDP, torchrun)", "",
        f"Cards: {', '.join(result['gpus']) or 'unknown'}. Command: `{result['command']}`", "",
        "Same model, data, global batch (train.batch_tokens over all GPUs), steps and seed. tokens/s: non-pad tokens "
        f"summed over the GPUs; steady = mean of the logged rates after step {args.warmup_steps}.", "",
        "| GPUs | backend | method | steps | tokens/s (whole run) | tokens/s (steady) | speed-up (steady) "
        "| final train loss | final eval loss | peak memory / GPU (MiB) | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['num_gpus']} | failed: {r['error']} | | | | | | | | | {r['wall_s']} |")
            continue
        lines.append(
            f"| {r['num_gpus']} | {r['backend']} | {r['method']} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
            f"{(r['steady_tokens_per_s'] or 0):,.0f} | {r.get('speedup_steady', 1.0 if r is one else '')}x | "
            f"{r['final_train_loss']:.4f} | {r['final_eval_loss']:.4f} | {r['peak_memory_mib_per_gpu']:,.0f} | {r['wall_s']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
