"""train.num_gpus: the stage relaunches itself under torchrun, one DDP process per GPU, with a global
batch. The same code runs here on CPU with two gloo processes (what torchrun runs on two GPUs, minus NCCL):
one process writes the reports and the adapter, the token counts are summed over both, and the loss ends
where a one-process run with the same global batch ends. The 2-GPU speed is measured on the GPU machine
(benchmarks/train_ddp.py, reports/benchmarks/train_ddp.*)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from wenyan import distributed
from stages import train as train_stage
from wenyan.errors import PipelineError
from conftest import shipped
from train_run import PROMPT, REPO, run_train as run, tiny_train_params


def test_launch_command_is_torchrun_with_the_same_arguments():
    cmd = distributed.launch_command("stages.train", 4, ["--train", "t.jsonl", "--out", "models/adapter"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=4" in cmd
    assert cmd[-6:] == ["-m", "stages.train", "--train", "t.jsonl", "--out", "models/adapter"]


@pytest.mark.parametrize("value", [0, -2])
def test_num_gpus_must_be_positive(tiny_train, value):
    with pytest.raises(PipelineError, match="train.num_gpus must be > 0"):
        train_stage.resolve_config(shipped("train", model=tiny_train["model"], num_gpus=value))


def test_more_gpus_than_visible_is_a_clear_error(tiny_train, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(PipelineError, match=r"train.num_gpus is 2 but 0 CUDA GPU\(s\) are visible"):
        run(tiny_train, tmp_path, num_gpus=2)


@pytest.mark.parametrize("visible, expected", [(None, "0"), ("2,3", "2"), ("1", "1"), ("", "")])
def test_one_gpu_runs_see_one_gpu(monkeypatch, visible, expected):
    """num_gpus 1 with several GPUs visible: Trainer would wrap the model in nn.DataParallel, which trl
    refuses ("does not support nn.DataParallel", seen on 2 x H100): the stage keeps the first one only."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    distributed.pin_one_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_a_torchrun_worker_keeps_its_gpus(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    distributed.pin_one_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


# ----------------------------------------------------------------------------------------------
# train.fsdp: the model sharded over the processes (FSDP2 through the Trainer), here on CPU over gloo


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, message", [
    (dict(num_gpus=1), r"train.fsdp shards the model over several GPUs: set train.num_gpus > 1"),
    (dict(num_gpus=2, backend="unsloth"), r"train.fsdp: unsloth does not support FSDP"),
    (dict(num_gpus=2, method="qlora"), r"train.fsdp shards 16/32-bit weights: method full or lora, not qlora"),
    (dict(num_gpus=2, method="lora", load_in_4bit=True), r"method full or lora, not lora with load_in_4bit"),
])
def test_fsdp_needs_several_processes_hf_and_16_bit_weights(tiny_train, overrides, message):
    with pytest.raises(PipelineError, match=message):
        train_stage.resolve_config(shipped("train", model=tiny_train["model"], fsdp=True, **overrides))


def run_two(tiny_train, base, **params) -> tuple[dict, subprocess.CompletedProcess]:
    """The stage over two gloo processes, exactly the command train.num_gpus=2 launches on two GPUs."""
    base.mkdir()
    params = tiny_train_params(tiny_train["model"], num_gpus=2, **params)
    (base / "params.yaml").write_text(yaml.safe_dump({"train": params, **PROMPT}, allow_unicode=True), encoding="utf-8")
    argv = ["--train", str(tiny_train["train"]), "--valid", str(tiny_train["valid"]), "--out", str(base / "adapter"),
            "--checkpoints", str(base / "checkpoints"), "--reports", str(base / "reports"),
            "--params", str(base / "params.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(distributed.launch_command("stages.train", 2, argv), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "rank1]" in line)[-6000:]
    return json.loads((base / "reports" / "summary.json").read_text()), proc


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_ddp_and_fsdp_train_like_one_and_save_one_model(tiny_train, tmp_path, method):
    """train.num_gpus=2 (DDP, exactly the command it launches on two GPUs) trains like one process with the same
    global batch; FSDP2 changes where the weights live, not the arithmetic: the same run as DDP over the same
    processes (same batches) to float precision, and as one process (other batch order) within DDP's margin."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    common = dict(max_steps=6, batch_size=8, eval_steps=0, save_steps=0, learning_rate=0.003 if method == "full" else 0.03,
                  method=method)
    one, _ = run(tiny_train, tmp_path, "one", **common)
    ddp, ddp_proc = run_two(tiny_train, tmp_path / "ddp", **{**common, "save_steps": 3})
    two, proc = run_two(tiny_train, tmp_path / "fsdp", fsdp=True, **common)

    # DDP (train.num_gpus=2 without fsdp) against one process: the same global batch, the same tokens
    assert one["processes"] == 1 and ddp["processes"] == 2
    assert ddp["steps"] == one["steps"] == 6
    assert ddp["rows_per_batch"] == one["rows_per_batch"] == 8  # the global batch: 4 rows in each process
    # 6 steps x 8 rows = the 48 examples once each: the counts summed over the two processes are exact
    assert ddp["completion_tokens_seen"] == one["completion_tokens_seen"]
    # one writer: a single model, a single set of dvclive plots, checkpoints from rank 0
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert ddp_proc.stderr.count("done: 6 steps") == 1
    assert two["fsdp"] is True and ddp["fsdp"] is False and two["processes"] == 2 and two["steps"] == 6
    assert two["tokens_seen"] == ddp["tokens_seen"] == one["tokens_seen"]
    assert two["final_eval_loss"] == pytest.approx(ddp["final_eval_loss"], rel=1e-4)
    assert two["final_train_loss"] == pytest.approx(ddp["final_train_loss"], rel=1e-4)
    start = math.log(400)
    drop = start - one["final_eval_loss"]
    assert drop > (0.2 if method == "full" else 0.05)  # rank-4 LoRA on a random model learns less
    # (seen, eval loss from 5.99: full 5.54 one process; LoRA 5.919 one process, 5.884 DDP and FSDP alike)
    # the same run split over two processes learns as much (the batches differ in order only: the length-grouped
    # sampler draws per process); a gradient averaged without the token-count correction would halve the drop
    # (seen, full: 5.54 one process vs 5.60 DDP from 5.99)
    assert abs(ddp["final_eval_loss"] - one["final_eval_loss"]) < (0.25 if method == "full" else 0.5) * drop
    assert abs(two["final_eval_loss"] - one["final_eval_loss"]) < 0.5 * drop
    assert proc.stderr.count("done: 6 steps") == 1  # one writer
    # one saved model, whole (not a shard), that loads back and is what was trained
    saved = tmp_path / "fsdp" / "adapter"
    if method == "full":
        weights = load_file(saved / "model.safetensors")
        reference = AutoModelForCausalLM.from_pretrained(tiny_train["model"]).state_dict()
        assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(reference[k].shape) for k in weights}
        ddp_weights = load_file(tmp_path / "ddp" / "adapter" / "model.safetensors")
        assert "lm_head.weight" not in weights  # tied to the embeddings, saved once as transformers does
        assert weights.keys() == ddp_weights.keys()
        assert all(torch.allclose(weights[k], ddp_weights[k], atol=1e-5) for k in weights)
        loaded = AutoModelForCausalLM.from_pretrained(saved)
        assert not torch.equal(loaded.model.layers[0].self_attn.q_proj.weight,
                               reference["model.layers.0.self_attn.q_proj.weight"])
    else:
        from wenyan import models

        weights = load_file(saved / "adapter_model.safetensors")
        ddp_weights = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
        assert weights.keys() == ddp_weights.keys() and all("lora_" in k for k in weights)
        assert all(torch.allclose(weights[k], ddp_weights[k], atol=1e-5) for k in weights)
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero
        trained = models.load_trained(saved, backend="hf")
        assert trained.is_adapter and trained.model is not None


def test_fsdp_with_an_extended_vocabulary_saves_a_model_that_loads(tiny_train_bytes, tmp_path):
    """train.extend_vocab adds the train split's characters as tokens (full: resized embeddings); sharded, the
    saved model holds them and loads back through models.load_trained."""
    from wenyan import models

    summary, _ = run_two(tiny_train_bytes, tmp_path / "fsdp", fsdp=True, method="full", extend_vocab="auto",
                         max_seq_length=512, max_steps=2, eval_steps=0, save_steps=0)
    assert summary["fsdp"] is True and summary["added_tokens"] > 0
    trained = models.load_trained(tmp_path / "fsdp" / "adapter", backend="hf")
    assert trained.model.get_input_embeddings().num_embeddings == len(trained.tokenizer)


@pytest.mark.bad_input
def test_fsdp_lora_with_added_tokens_is_one_clear_error(tiny_train_bytes, tmp_path):
    base = tmp_path / "lora"
    base.mkdir()
    params = tiny_train_params(tiny_train_bytes["model"], num_gpus=2, fsdp=True, method="lora", extend_vocab="auto",
                               max_seq_length=512, max_steps=2, eval_steps=0, save_steps=0)
    (base / "params.yaml").write_text(yaml.safe_dump({"train": params, **PROMPT}, allow_unicode=True), encoding="utf-8")
    argv = ["--train", str(tiny_train_bytes["train"]), "--valid", str(tiny_train_bytes["valid"]), "--out", str(base / "adapter"),
            "--checkpoints", str(base / "checkpoints"), "--reports", str(base / "reports"), "--params", str(base / "params.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(distributed.launch_command("stages.train", 2, argv), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert "error: train.fsdp with method lora cannot shard the" in proc.stderr
    assert "set train.extend_vocab: none" in proc.stderr
