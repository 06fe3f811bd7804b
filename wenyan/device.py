"""Where a model runs: the backend (unsloth or plain transformers), the device and dtype, and a process's own GPU
under torchrun. Loading (wenyan/models.py) and generation (wenyan/generation.py) both ask here, so an edit
to the generation loop does not touch what training depends on."""

from __future__ import annotations

from wenyan.errors import PipelineError, get_logger

log = get_logger("device")


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
