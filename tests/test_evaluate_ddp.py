"""evaluate.num_gpus: evaluate and evaluate_base start themselves again under torchrun, each process generates
its shard of the sentences, rank 0 gathers the outputs in order and alone scores and writes. Here on CPU with
two gloo processes (what torchrun runs on two GPUs, minus NCCL): the reports are byte for byte those of one
process. The speed on GPUs waits for a multi-GPU machine."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from wenyan import distributed, generation
from stages import evaluate, evaluate_base
from wenyan.errors import PipelineError
from wenyan.files import write_jsonl
from test_evaluate import ROOT, make_model, make_rows, run_stage, tiny, write_params  # noqa: F401  (tiny: fixture)

OUTPUTS = ("metrics.json", "hypotheses.jsonl", "base_outputs.jsonl", "evaluate/by_book.csv",
           "evaluate/by_length.csv", "evaluate/samples.md")


@pytest.mark.parametrize("batch_size, processes", [(3, 2), (4, 3), (16, 2), (1, 4)])
def test_shards_put_together_are_the_one_process_outputs(tiny, batch_size, processes):  # noqa: F811
    """Every sentence in exactly one shard, and its output is what one process gives (whole batches)."""
    tok = tiny["tokenizer"]
    model = make_model(tok, seed=3)
    with torch.no_grad():  # some rows end their turn early, others run to their budget
        model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>")] *= 2.0
    rows = make_rows()
    prompts, sources = [r["messages"][:-1] for r in rows], [r["source"] for r in rows]
    kwargs = dict(batch_size=batch_size, factor=1.0, extra=6)
    one = generation.generate(model, tok, prompts, sources, **kwargs)
    shards = [generation.generate(model, tok, prompts, sources, shard=(rank, processes), **kwargs)
              for rank in range(processes)]
    for i in range(len(rows)):
        owners = [k for k, (texts, _) in enumerate(shards) if texts[i] is not None]
        assert len(owners) == 1
        assert (shards[owners[0]][0][i], shards[owners[0]][1][i]) == (one[0][i], one[1][i])
    assert any(one[1]) and not all(one[1])
    sizes = [sum(t is not None for t in texts) for texts, _ in shards]
    assert max(sizes) - min(sizes) <= batch_size  # whole batches dealt out in turn


def test_gather_shards_in_a_plain_process_returns_the_lists():
    assert distributed.gather_shards(["a", "b"], [True, False]) == (["a", "b"], [True, False])


def test_two_processes_write_the_reports_of_one(tiny, tmp_path):  # noqa: F811
    one = run_stage(tmp_path, tiny["adapter"], tag="one", batch_size=3)

    two = tmp_path / "two"
    two.mkdir()
    test = two / "test.jsonl"
    write_jsonl(test, make_rows())
    params = write_params(two / "params.yaml", base_model=str(tiny["base_dir"]), batch_size=3, num_gpus=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    from stages import base

    base.main(["--out", str(two / "models-base"), "--params", str(params)])
    # exactly the commands evaluate.num_gpus=2 launches on a machine with two GPUs
    commands = [
        ["stages.evaluate_base", "--test", str(test), "--base", str(two / "models-base"), "--out", str(two / "base_outputs.jsonl"),
         "--params", str(params)],
        ["stages.evaluate", "--test", str(test), "--model", str(tiny["adapter"]), "--metrics", str(two / "metrics.json"),
         "--out-dir", str(two / "evaluate"), "--hypotheses", str(two / "hypotheses.jsonl"), "--params", str(params),
         "--base-outputs", str(two / "base_outputs.jsonl")],
    ]
    for module, *argv in commands:
        proc = subprocess.run(distributed.launch_command(module, 2, argv), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    for name in OUTPUTS:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert proc.stderr.count("wrote ") == 1  # one writer: rank 0
    assert "fine-tuned: 16 sentences" in proc.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize("stage", ["evaluate", "base"])
def test_more_gpus_than_visible_is_a_clear_error(tiny, tmp_path, monkeypatch, stage):  # noqa: F811
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    params = write_params(tmp_path / "params.yaml", base_model=str(tiny["base_dir"]), num_gpus=3)
    test = tmp_path / "test.jsonl"
    write_jsonl(test, make_rows())
    argv = (["--test", str(test), "--base", str(tmp_path / "models-base"), "--out", str(tmp_path / "b.jsonl")]
            if stage == "base" else
            ["--test", str(test), "--model", str(tiny["adapter"]), "--metrics", str(tmp_path / "m.json"),
             "--out-dir", str(tmp_path / "e"), "--hypotheses", str(tmp_path / "h.jsonl")])
    with pytest.raises(PipelineError, match=r"^evaluate.num_gpus is 3 but 1 CUDA GPU\(s\) are visible; "
                                            r"set evaluate.num_gpus to at most 1$"):
        (evaluate_base if stage == "base" else evaluate).main([*argv, "--params", str(params)])
