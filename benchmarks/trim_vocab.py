"""train.trim_vocab side by side on this machine: the train stage on the shipped params (Gemma 3 270M, LoRA) with the
whole 262,144-token vocabulary and trimmed (auto), the same steps and rows; and how many test conversations encode
to the same tokens after trimming.

    python benchmarks/trim_vocab.py --steps 10 --out reports/benchmarks/trim_vocab     (after `dvc repro format base`)

Each arm is `python -m stages.train` in a process of its own (peak RSS its own), data/format/{train,valid}.jsonl,
--params WORK/ARM/params.yaml (params.yaml with train.trim_vocab and train.max_steps set, eval and checkpoints off).
Writes OUT.json and OUT.md: tokens/s, train time, peak memory, the vocabulary and the ratio trimmed / full. The GPU
figures (unsloth, full fine-tuning, H100): reports/runs/h100-gemma-trim-speed (benchmarks/device/gemma_arms.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def arm(name: str, setting: str, steps: int, work: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["train"].update(trim_vocab=setting, max_steps=steps, eval_samples=0, eval_steps=0, save_steps=0)
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    (d / "pre").mkdir(exist_ok=True)
    (d / "pre" / "pretrain.json").write_text('{"passthrough": true}\n')
    cmd = [sys.executable, "-m", "stages.train", "--train", "data/format/train.jsonl", "--valid", "data/format/valid.jsonl",
           "--base", str(d / "pre"), "--out", str(d / "adapter"), "--checkpoints", str(d / "ckpt"),
           "--reports", str(d / "reports"), "--params", str(d / "params.yaml"), "--timings", str(d / "timings.json")]
    started = time.perf_counter()
    with (d / "train.log").open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"error: arm {name} failed; see {d / 'train.log'}")
    metrics = {**json.loads((d / "reports" / "metrics.json").read_text()), **json.loads((d / "timings.json").read_text())}
    config = json.loads((d / "adapter" / "training_config.json").read_text())
    return {"arm": name, "trim_vocab": setting, "vocab_size": config["vocab_size"], "steps": metrics["step"],
            "tokens_per_s": metrics["tokens_per_s"], "train_time_s": metrics["train_time_s"],
            "wall_s": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "final_loss": metrics["train"]["loss"], "device": metrics["device"]}


def same_encodings(adapter: Path, n: int = 500) -> dict:
    """Test conversations (data/format/test.jsonl) encoded alike by the full and the trimmed tokenizer."""
    from wenyan import models, trim
    from wenyan.prompt import encode_messages

    trimmed = models.load_trained_tokenizer(adapter)
    kept = trim.read_kept(adapter)
    config = json.loads((adapter / "training_config.json").read_text())
    full = models.load_tokenizer(config["model"], config["chat_template"])
    rows = [json.loads(line) for line in (REPO / "data/format/test.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
    a, b = encode_messages(full, [r["messages"] for r in rows]), encode_messages(trimmed, [r["messages"] for r in rows])
    same = sum([kept[i] for i in p2 + r2] == p1 + r1 for (p1, r1, _), (p2, r2, _) in zip(a, b))
    return {"test_conversations": len(rows), "encoded_alike": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path("/tmp/trim_vocab_bench"))
    parser.add_argument("--out", type=Path, default=REPO / "reports/benchmarks/trim_vocab")
    args = parser.parse_args()
    rows = [arm("full", "none", args.steps, args.work), arm("trimmed", "auto", args.steps, args.work)]
    full, trimmed = rows
    result = {"arms": rows, "speedup": round(trimmed["tokens_per_s"] / full["tokens_per_s"], 2),
              "memory_ratio": round(full["peak_rss_mib"] / trimmed["peak_rss_mib"], 2),
              **same_encodings(args.work / "trimmed" / "adapter"), "load_average": os.getloadavg(),
              "command": f"python benchmarks/trim_vocab.py --steps {args.steps}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = ["# train.trim_vocab on this machine (CPU, the shipped LoRA params, Gemma 3 270M)", "",
             f"`{result['command']}`; load average {', '.join(f'{x:.2f}' for x in result['load_average'])}", "",
             "| arm | vocabulary | steps | tokens/s | train s | peak RSS MiB | final loss |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['arm']} | {r['vocab_size']:,} | {r['steps']} | {r['tokens_per_s']:,} | {r['train_time_s']} | "
              f"{r['peak_rss_mib']:,} | {r['final_loss']:.4f} |" for r in rows]
    lines += ["", f"Trimmed / full tokens/s: **{result['speedup']}x**; peak RSS full / trimmed: {result['memory_ratio']}x. "
              f"Test conversations encoded to the same tokens (ids mapped back): {result['encoded_alike']} of "
              f"{result['test_conversations']}.", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
