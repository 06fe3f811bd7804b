"""benchmarks/train_ddp.py --tiny: the 1-vs-N-GPU benchmark of a Llama-3.2-1B-shaped model, run on a tiny shape
with two gloo processes on CPU, so the script is known to run the day a multi-GPU machine is lent. The
figures themselves (CPU processes on a shared machine) mean nothing; the fields and the runs do."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from train_run import REPO


def test_llama_1b_shape_is_llama_3_2_1b():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_ddp
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**train_ddp.LLAMA_3_2_1B)
    with __import__("torch").device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert n == 1_235_814_400  # Llama-3.2-1B's parameter count (tied embeddings counted once)
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0


def test_tiny_benchmark_runs_one_and_two_processes(tiny_train, tmp_path):
    """The benchmark's plumbing (one process, then torchrun, the speed-up, the table) on one method: the two
    methods over two processes are trained and compared in test_train_ddp.py."""
    out = tmp_path / "train_ddp"
    cmd = [sys.executable, "benchmarks/train_ddp.py", "--train", str(tiny_train["train"]), "--valid", str(tiny_train["valid"]),
           "--tiny", "--methods", "lora", "--gpus", "1,2", "--out", str(out), "--warmup-steps", "1",
           "-S", "backend=hf", "-S", "max_steps=3", "-S", "batch_tokens=0", "-S", "batch_size=8", "-S", "eval_samples=8",
           "-S", "eval_steps=0", "-S", "logging_steps=1", "-S", "warmup_steps=0", "-S", "max_seq_length=128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    runs = {(r["method"], r["num_gpus"]): r for r in result["runs"]}
    assert set(runs) == {("lora", 1), ("lora", 2)}
    for (method, n), r in runs.items():
        assert r["processes"] == n and r["steps"] == 3 and r["backend"] == "hf"
        assert r["tokens_per_s"] > 0 and r["peak_memory_mib_per_gpu"] > 0
        assert r["final_train_loss"] < 11.0 and r["final_eval_loss"] is not None  # random 49k-token vocabulary: ~10.8
        assert r["tokens_seen"] == runs[(method, 1)]["tokens_seen"]  # same global batch and steps
        if n == 2:
            assert r["speedup"] > 0 and "speedup_whole_run" in r
    assert 0 < runs[("lora", 1)]["trainable_params"] < runs[("lora", 1)]["total_params"] / 10
    assert "tiny Llama-3.2" in result["model_shape"]
    table = out.with_suffix(".md").read_text()
    assert table.count("| lora |") == 2
