"""Several GPUs, one process each (torchrun): what the train and evaluate stages share (a library module).

A stage whose `num_gpus` param is above 1 starts itself again under torchrun with the same arguments
(launch); each process finds its rank in torchrun's environment (world), joins the process group
(init_distributed: NCCL on GPUs, gloo on CPU, which is how the tests run two processes without a GPU),
and only rank 0 writes outputs. Nothing here assumes a GPU count: torchrun's world size is the count.

    train:     DDP (or FSDP) over the processes, the global batch split evenly (stages/train.py).
    evaluate:  each process generates whole batches of the length-sorted sentences (generation.generate's
               `shard`), gather_shards brings the outputs back in their original order, rank 0 scores.
"""

from __future__ import annotations

import os
import subprocess
import sys

from wenyan.errors import PipelineError, get_logger

log = get_logger("distributed")


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the one process that writes reports and models."""
    return world()[0] == 0


def launch_command(module: str, num_processes: int, argv: list[str]) -> list[str]:
    """`python -m module argv` again under torchrun (torch.distributed.run), one process per GPU."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
            "-m", module, *argv]


def check_gpus(key: str, wanted: int) -> None:
    """`key` (e.g. train.num_gpus) asks for `wanted` GPUs: one clear error when fewer are visible."""
    import torch

    visible = torch.cuda.device_count()
    if visible < wanted:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise PipelineError(
            f"{key} is {wanted} but {visible} CUDA GPU(s) are visible"
            f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}; set {key} to at most {max(visible, 1)}"
        )


def launch(module: str, key: str, wanted: int, argv: list[str]) -> None:
    """`key` > 1 in a plain process: check the GPUs are there, run torchrun, fail with one line if it fails."""
    check_gpus(key, wanted)
    cmd = launch_command(module, wanted, argv)
    log.info("%s=%d: launching %s", key, wanted, " ".join(cmd[1:]))
    code = subprocess.run(cmd).returncode
    if code:
        raise PipelineError(f"the {wanted}-process torchrun run of {module} failed (exit {code}); its log is above")


def pin_one_gpu() -> None:
    """num_gpus 1 on a machine with several GPUs: make only the first visible one visible. Otherwise
    transformers' Trainer wraps the model in nn.DataParallel over all of them, which trl refuses (seen on a
    2 x H100 machine). Must run before CUDA is initialised; a run under torchrun is left alone."""
    if world()[2] > 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible is not None else "0"
    if visible != first:
        os.environ["CUDA_VISIBLE_DEVICES"] = first
        log.info("num_gpus is 1: running on GPU %s only (CUDA_VISIBLE_DEVICES=%s)", first, first)


def init_distributed(on_gpu: bool, quiet: list | tuple = ()) -> None:
    """The process group, before anything rank 0 must do first (accelerate reuses an initialised one).
    `quiet`: loggers that only rank 0 lets through below WARNING (one log, from rank 0)."""
    import torch
    import torch.distributed as dist

    rank, local_rank, size = world()
    if size == 1 or dist.is_initialized():
        return
    if on_gpu:
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    if rank != 0:
        for logger in quiet:
            logger.setLevel("WARNING")


def finish() -> None:
    """Leave the process group (torch warns about a process that exits without)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def summed(value: int) -> int:
    """A count summed over all processes (itself in a plain process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def gather_shards(*columns: list) -> tuple[list, ...]:
    """Each process holds its shard of some equally long lists (None where another process's items are);
    return the lists complete, in their original order, on every process (all_gather_object: pickled
    Python objects, over gloo or NCCL). In a plain process the lists come back as they are."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return columns
    mine = {i: tuple(c[i] for c in columns) for i in range(len(columns[0])) if columns[0][i] is not None}
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, mine)
    merged = [list(c) for c in columns]
    for shard in shards:
        for i, values in shard.items():
            for column, value in zip(merged, values):
                column[i] = value
    missing = [i for i, value in enumerate(merged[0]) if value is None]
    if missing:  # a sharding bug, not a user error
        raise RuntimeError(f"gather_shards: no process produced item(s) {missing[:5]}")
    return tuple(merged)


def relaunched(module: str, key: str, num_gpus: int, argv: list[str], quiet: list | tuple = ()) -> bool:
    """`key` (e.g. evaluate.num_gpus) > 1 in a plain process: run this same command (`python -m module argv`)
    under torchrun (True: it is done). Under torchrun (launched so, or by hand): join the process group and go on
    with whatever world size."""
    if num_gpus > 1 and world()[2] == 1:
        launch(module, key, num_gpus, argv)
        return True
    import torch

    init_distributed(torch.cuda.is_available(), quiet=quiet)
    return False
