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

from stages import train as train_stage
from stages.common import PipelineError
from conftest import shipped
from test_train import PROMPT, REPO, run, tiny, tiny_train_params  # noqa: F401  (tiny: the module-scoped fixture)


def test_launch_command_is_torchrun_with_the_same_arguments():
    cmd = train_stage.launch_command(4, ["--train", "t.jsonl", "--out", "models/adapter"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=4" in cmd
    assert cmd[-6:] == ["-m", "stages.train", "--train", "t.jsonl", "--out", "models/adapter"]


@pytest.mark.parametrize("value", [0, -2])
def test_num_gpus_must_be_positive(tiny, value):  # noqa: F811
    with pytest.raises(PipelineError, match="train.num_gpus must be > 0"):
        train_stage.resolve_config(shipped("train", model=tiny["model"], num_gpus=value))


def test_more_gpus_than_visible_is_a_clear_error(tiny, tmp_path, monkeypatch):  # noqa: F811
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(PipelineError, match=r"train.num_gpus is 2 but 0 CUDA GPU\(s\) are visible"):
        run(tiny, tmp_path, num_gpus=2)


def test_two_processes_train_like_one_with_the_same_global_batch(tiny, tmp_path):  # noqa: F811
    common = dict(max_steps=6, batch_size=8, eval_steps=0, save_steps=3, learning_rate=0.003, method="full")
    one, _ = run(tiny, tmp_path, "one", **common)

    base = tmp_path / "two"
    base.mkdir()
    params = tiny_train_params(tiny["model"], **common)
    (base / "params.yaml").write_text(yaml.safe_dump({"train": params, **PROMPT}, allow_unicode=True), encoding="utf-8")
    argv = ["--train", str(tiny["train"]), "--valid", str(tiny["valid"]), "--out", str(base / "adapter"),
            "--checkpoints", str(base / "checkpoints"), "--reports", str(base / "reports"),
            "--params", str(base / "params.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # exactly the command train.num_gpus=2 launches on a machine with two GPUs
    proc = subprocess.run(train_stage.launch_command(2, argv), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((base / "reports" / "summary.json").read_text())

    assert one["processes"] == 1 and two["processes"] == 2
    assert two["steps"] == one["steps"] == 6
    assert two["rows_per_batch"] == one["rows_per_batch"] == 8  # the global batch: 4 rows in each process
    # 6 steps x 8 rows = the 48 examples once each: the counts summed over the two processes are exact
    assert two["tokens_seen"] == one["tokens_seen"]
    assert two["completion_tokens_seen"] == one["completion_tokens_seen"]
    # the same run split over two processes learns as much: the eval loss falls by the same amount
    # (the batches differ in order only: the length-grouped sampler draws per process)
    start = math.log(400)  # a random tiny model over a 400-token vocabulary
    assert one["final_eval_loss"] < start - 0.3
    # (seen: 5.54 vs 5.60 from 5.99; a gradient averaged without the token-count correction would halve the drop)
    assert abs(two["final_eval_loss"] - one["final_eval_loss"]) < 0.25 * (start - one["final_eval_loss"])
    # one writer: a single adapter, a single set of dvclive plots, checkpoints from rank 0
    assert (base / "adapter" / "model.safetensors").is_file()
    assert sorted(p.name for p in (base / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert proc.stderr.count("done: 6 steps") == 1


@pytest.mark.parametrize("visible, expected", [(None, "0"), ("2,3", "2"), ("1", "1"), ("", "")])
def test_one_gpu_runs_see_one_gpu(monkeypatch, visible, expected):
    """num_gpus 1 with several GPUs visible: Trainer would wrap the model in nn.DataParallel, which trl
    refuses ("does not support nn.DataParallel", seen on 2 x H100): the stage keeps the first one only."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    train_stage.pin_one_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_a_torchrun_worker_keeps_its_gpus(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    train_stage.pin_one_gpu()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
