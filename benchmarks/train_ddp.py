"""Benchmark train.num_gpus: the train stage on 1 GPU against N GPUs (DDP, or FSDP with -S fsdp=true, through
torchrun), same model, data, global batch, steps and seed; tokens/s, memory and the final losses side by side.

    python benchmarks/train_ddp.py --train data/format/train.jsonl --valid data/format/valid.jsonl \
        --gpus 1,2 --out reports/benchmarks/train_ddp -S backend=unsloth -S method=full -S max_steps=60
    # -S: any train: parameter (params.yaml's train: section is the base)

A 1B-parameter model, where data parallelism should pay (issue 16): --llama-1b builds a model of
Llama-3.2-1B-Instruct's shape from its config (written below: no hub) with random weights, and
--methods lora,full runs both fine-tunings:

    python benchmarks/train_ddp.py --train data/format/train.jsonl --valid data/format/valid.jsonl \
        --llama-1b --methods lora,full --gpus 1,2 --out reports/benchmarks/train_ddp_1b \
        -S backend=hf -S batch_tokens=32768 -S max_steps=60 -S warmup_steps=10 -S eval_steps=0 -S logging_steps=5

    python benchmarks/train_ddp.py --train T --valid V --tiny --methods lora,full --gpus 1,2 --out /tmp/smoke
    # --tiny: the same code on a tiny shape; without CUDA the N-process runs are gloo processes on CPU
    # (tests/test_benchmarks.py runs it so, so the script is known to run before a multi-GPU machine is lent)

The model's tokenizer is SmolLM2's (the project's offline default) over the 128,256-row embedding: the
arithmetic of Llama-3.2-1B (its own tokenizer would spend fewer tokens a character, which does not change
tokens/s at a batch sized in tokens). Random weights: the loss starts near ln(128256) = 11.8 and the
losses compare 1 vs N GPUs, not models.

Each run is `python -m stages.train ... --params <file with train.num_gpus=N>` in a fresh process, the
command dvc.yaml runs; with N > 1 the stage relaunches itself under torchrun (on a machine without CUDA the
script starts torchrun itself, as the stage would on GPUs). Reported per run:
- tokens/s over the whole run (exact non-pad token counts summed over the processes / training time,
  compilation and warm-up included) and in steady state (the mean of the logged rates after
  --warmup-steps; under DDP each logged rate is rank 0's share x N);
- the final train loss, the final eval loss (same valid rows), peak memory per GPU (rank 0's), wall time;
- speedup: N GPUs' steady tokens/s over 1 GPU's, same method (and the whole-run ratio).
Writes <out>.json and <out>.md, with the card's name.
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

import yaml

REPO = Path(__file__).resolve().parents[1]

# Llama-3.2-1B-Instruct's config.json (meta-llama/Llama-3.2-1B-Instruct), the values that shape the compute
LLAMA_3_2_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
    tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
)
# the same architecture, small enough for a CPU smoke test
TINY = {**LLAMA_3_2_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152}  # SmolLM2's vocabulary: all the tokenizer needs


def build_model(shape: dict, out: Path, seed: int = 0) -> str:
    """A model directory of this shape with random weights (bf16, as the released checkpoint) and SmolLM2's
    tokenizer with its chat template; eos/pad from the tokenizer. Returns its path (train.model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from wenyan import models
    from wenyan.prompt import fix_special_tokens

    location, gguf_file = models.resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf_file)
    fix_special_tokens(tokenizer)  # eos = the end-of-turn token, a pad token apart from it, as load_tokenizer
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    target = out / "model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    n = sum(p.numel() for p in model.parameters())
    print(f"==> random {n / 1e9:.2f}B-parameter Llama ({shape['num_hidden_layers']} layers, hidden "
          f"{shape['hidden_size']}, vocab {shape['vocab_size']}) in {target}", flush=True)
    return str(target)


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        return []


def steady_rate(timings: Path, warmup_steps: int) -> float | None:
    """The mean per-interval tokens/s after warmup_steps, from the train stage's --timings curve."""
    if not timings.is_file():
        return None
    rows = json.loads(timings.read_text(encoding="utf-8"))["curve"]
    rates = [float(r["tokens_per_s"]) for r in rows if int(r["step"]) > warmup_steps]
    return round(sum(rates) / len(rates), 1) if rates else None


def run_one(n: int, args, train_params: dict, work: Path) -> dict:
    import torch

    from wenyan import distributed

    method = train_params["method"]
    base = work / f"{method}-gpus-{n}"
    base.mkdir(parents=True, exist_ok=True)
    shipped = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))  # train also reads format, clean.opencc
    params = {**{k: shipped[k] for k in ("format", "clean")}, "train": {**train_params, "num_gpus": n,
                                                                        "fsdp": bool(train_params.get("fsdp")) and n > 1}}
    (base / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    argv = ["--train", args.train, "--valid", args.valid, "--out", str(base / "adapter"),
            "--checkpoints", str(base / "checkpoints"), "--reports", str(base / "reports"),
            "--params", str(base / "params.yaml"), "--timings", str(base / "timings.json")]
    if n > 1 and not torch.cuda.is_available():  # CPU smoke test: gloo processes, started as the stage would
        cmd = distributed.launch_command("stages.train", n, argv)
    else:
        cmd = [sys.executable, "-m", "stages.train", *argv]
    print(f"==> {method}, {n} GPU(s): {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    wall = time.time() - start
    if proc.returncode != 0:
        return {"method": method, "num_gpus": n, "error": f"exit {proc.returncode}", "wall_s": round(wall, 1)}
    # summary.json: what the run did; --timings: its measurements (times, tokens/s, memory, device)
    s = {**json.loads((base / "reports" / "summary.json").read_text()), **json.loads((base / "timings.json").read_text())}
    return {
        "num_gpus": n,
        "processes": s["processes"],
        "fsdp": s.get("fsdp", False),
        "backend": s["backend"],
        "method": s["method"],
        "device": s["device"],
        "total_params": s["total_params"],
        "trainable_params": s["trainable_params"],
        "steps": s["steps"],
        "rows_per_batch": s["rows_per_batch"],
        "tokens_seen": s["tokens_seen"],
        "train_time_s": s["train_time_s"],
        "tokens_per_s": s["tokens_per_s"],
        "steady_tokens_per_s": steady_rate(base / "timings.json", args.warmup_steps),
        "final_train_loss": s["final_train_loss"],
        "final_eval_loss": s["final_eval_loss"],
        "peak_memory_mib_per_gpu": s["peak_memory_mib"],
        "peak_memory_kind": s["peak_memory_kind"],
        "wall_s": round(wall, 1),
    }


def speedups(runs: list[dict]) -> None:
    """speedup (steady tokens/s, else whole run) and the loss differences against the same method on 1 GPU."""
    for r in runs:
        one = next((o for o in runs if o["method"] == r["method"] and o["num_gpus"] == 1 and "error" not in o), None)
        if "error" in r or one is None:
            continue
        r["speedup_whole_run"] = round(r["tokens_per_s"] / one["tokens_per_s"], 2)
        if r["steady_tokens_per_s"] and one["steady_tokens_per_s"]:
            r["speedup_steady"] = round(r["steady_tokens_per_s"] / one["steady_tokens_per_s"], 2)
        r["speedup"] = r.get("speedup_steady", r["speedup_whole_run"])
        if r["final_eval_loss"] is not None and one["final_eval_loss"] is not None:
            r["eval_loss_diff"] = round(r["final_eval_loss"] - one["final_eval_loss"], 4)
        r["train_loss_diff"] = round(r["final_train_loss"] - one["final_train_loss"], 4)


def fmt(value, pattern: str) -> str:
    return "" if value is None else format(value, pattern)


# Long (~70 lines): a benchmark's arguments, its runs and its report in one place.
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--valid", required=True)
    parser.add_argument("--gpus", default="1,2", help="comma-separated GPU counts, e.g. 1,2")
    parser.add_argument("--methods", default=None, help="comma-separated train.method values (default: the params')")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--llama-1b", action="store_true", help="a random model of Llama-3.2-1B-Instruct's shape")
    shape.add_argument("--tiny", action="store_true", help="the same, tiny (a CPU smoke test)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the steady-state rate")
    parser.add_argument("--out", default="reports/benchmarks/train_ddp")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="a train: parameter")
    args = parser.parse_args(argv)
    args.train, args.valid = str(Path(args.train).resolve()), str(Path(args.valid).resolve())

    train_params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["train"]
    for item in args.set:
        key, _, value = item.partition("=")
        train_params[key.removeprefix("train.")] = yaml.safe_load(value)
    train_params.update(resume=False, save_steps=0)
    counts = [int(x) for x in args.gpus.split(",")]
    methods = args.methods.split(",") if args.methods else [train_params["method"]]
    with tempfile.TemporaryDirectory(prefix="train_ddp_") as tmp:
        if args.llama_1b or args.tiny:
            train_params["model"] = build_model(TINY if args.tiny else LLAMA_3_2_1B, Path(tmp), train_params["seed"])
        runs = [run_one(n, args, {**train_params, "method": method}, Path(tmp)) for method in methods for n in counts]
    speedups(runs)
    result = {
        "what": "train stage, 1 vs N GPUs (DDP via torchrun), same model/data/global batch/steps/seed",
        "command": "python benchmarks/train_ddp.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "gpus": gpu_names(),
        "model_shape": "Llama-3.2-1B-Instruct (random weights)" if args.llama_1b else
                       "tiny Llama-3.2 architecture (random weights)" if args.tiny else train_params["model"],
        "train_params": {k: train_params[k] for k in ("model", "backend", "batch_tokens", "batch_size", "max_steps",
                                                      "learning_rate", "max_train_samples", "max_seq_length", "fsdp",
                                                      "seed") if k in train_params},
        "runs": runs,
    }
    if args.llama_1b or args.tiny:
        result["train_params"]["model"] = result["model_shape"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [
        "# Train stage: 1 GPU vs several (DDP, torchrun)", "",
        f"Cards: {', '.join(result['gpus']) or 'none (CPU processes)'}. Model: {result['model_shape']}. "
        f"Command: `{result['command']}`", "",
        "Same model, data, global batch (train.batch_tokens over all GPUs), steps and seed. tokens/s: non-pad tokens "
        f"summed over the GPUs; steady = mean of the logged rates after step {args.warmup_steps}; speed-up against "
        "the same method on 1 GPU; memory: rank 0's peak.", "",
        "| method | GPUs | backend | steps | tokens/s (whole run) | tokens/s (steady) | speed-up "
        "| final train loss | final eval loss | peak memory / GPU (MiB) | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['num_gpus']} | failed: {r['error']} | | | | | | | | {r['wall_s']} |")
            continue
        speed = "1.00x" if r["num_gpus"] == 1 else (f"{r['speedup']:.2f}x" if "speedup" in r else "")
        lines.append(
            f"| {r['method']}{' (FSDP)' if r['fsdp'] else ''} | {r['num_gpus']} | {r['backend']} | {r['steps']} | "
            f"{r['tokens_per_s']:,.0f} | {fmt(r['steady_tokens_per_s'], ',.0f')} | {speed} | "
            f"{fmt(r['final_train_loss'], '.4f')} | {fmt(r['final_eval_loss'], '.4f')} | "
            f"{r['peak_memory_mib_per_gpu']:,.0f} | {r['wall_s']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    if any("error" in r for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
