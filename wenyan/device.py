"""Where a model runs: the backend (unsloth or plain transformers), the device and dtype, and a process's own GPU
under torchrun. Loading (wenyan/models.py) and generation (wenyan/generation.py) both ask here, so an edit
to the generation loop does not touch what training depends on."""

from __future__ import annotations

import os
import platform

from wenyan.errors import PipelineError, get_logger

log = get_logger("device")

CPU_KERNELS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}, "as-is": {}}


def pin_cpu_kernels() -> None:
    """The same CPU kernels on every x86-64 machine, so that CPU training gives the same bits, and a clone the
    committed dvc.lock hashes, on another CPU (README "What DVC hashes"; benchmarks/cpu_determinism.py).

    torch picks its vector kernels (ATEN_CPU_CAPABILITY) and MKL its matrix-multiply code (MKL_CBWR) by the CPU:
    AVX-512 where the CPU has it, AVX2 on most others, and the two round differently (losses apart by ~1e-6,
    other dvc.lock hashes, the same BLEU). The thread count does not change the bits (measured: 1, 2, 4
    threads). WENYAN_CPU_KERNELS=avx2 (the default) asks both for AVX2, which every x86-64 CPU of the last
    decade has; `as-is` leaves the choice to them (may be faster on an AVX-512 CPU, not measured; other hashes
    there). A variable the user set already is left alone. Both libraries read these at their first operation,
    not at import: this runs when wenyan.device is imported, which every stage that computes with torch does
    first."""
    choice = os.environ.get("WENYAN_CPU_KERNELS", "avx2")
    if choice not in CPU_KERNELS:
        log.warning("WENYAN_CPU_KERNELS=%s is not one of %s; using avx2", choice, ", ".join(CPU_KERNELS))
        choice = "avx2"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return  # arm64 (Apple silicon, Graviton): one kernel set there, other bits than x86-64's
    for name, value in CPU_KERNELS[choice].items():
        os.environ.setdefault(name, value)


pin_cpu_kernels()  # at import: before the process's first torch operation


def pick_backend(requested: str) -> str:
    """'unsloth' or 'hf' for a requested backend (train.backend, or what a trained model was trained with).

    hf = plain transformers; unsloth = unsloth, which must work when asked for by name; auto = unsloth
    when CUDA is there and it imports, else hf. Importing unsloth patches transformers/peft/trl, so this
    runs before they are imported."""
    import torch

    if requested == "hf":
        return "hf"
    if not torch.cuda.is_available():
        if requested == "unsloth":
            raise PipelineError("backend unsloth needs a CUDA GPU; none is visible (use backend: hf or auto)")
        return "hf"
    try:
        import unsloth  # noqa: F401  (must come before transformers, peft and trl)
    except Exception as exc:  # ImportError, or unsloth's own errors on an unsupported setup
        if requested == "unsloth":
            raise PipelineError(f"backend unsloth: `import unsloth` failed: {exc}") from exc
        log.warning("unsloth is not usable (%s); using plain transformers", exc)
        return "hf"
    return "unsloth"


def own_gpu() -> dict:
    """unsloth's loading argument under torchrun (evaluate.num_gpus > 1): each process on its own GPU."""
    from wenyan.distributed import world

    return {"device_map": {"": world()[1]}} if world()[2] > 1 else {}


def device_and_dtype():
    """cuda in bf16 (fp16 where bf16 is missing), else cpu in fp32 (bf16 on CPU changes greedy outputs)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", torch.float32
    return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
