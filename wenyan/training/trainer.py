"""The trainer both training stages use: one build_trainer (trl's SFTTrainer, unsloth's once unsloth is imported,
counting the real and the trained tokens), its arguments (the schedule train and pretrain share; train's SFTConfig),
the checks of the settings transformers alone would refuse, and sharded training (train.fsdp).
"""

from __future__ import annotations

import os

from wenyan.distributed import world
from wenyan.errors import PipelineError


# ----------------------------------------------------------------------------------------------
# Sharded training (train.fsdp): a model whose weights, gradients and optimizer state do not fit on one GPU
#
# What the engines offer: transformers' Trainer (so trl's SFTTrainer) takes `fsdp` + `fsdp_config` and hands
# them to accelerate, which wraps the model in PyTorch's FSDP2 (`fully_shard`, one unit per decoder layer):
# parameters, gradients and optimizer state are split over the processes and each layer is gathered only
# while it computes. That fits this stage as it is (torchrun already starts one process per GPU), so
# train.fsdp is that switch. unsloth has no FSDP (its multi-GPU mode is DDP, a whole model per GPU), and a
# 4-bit base (qlora) is bitsandbytes' format, which this path does not shard. DeepSpeed ZeRO-3 would do the
# same job through another package and config file; FSDP2 ships with torch.


def check_fsdp(cfg: dict) -> None:
    """train.fsdp needs several processes, the hf backend and a 16/32-bit model (method full or lora)."""
    if not cfg["fsdp"]:
        return
    if cfg["num_gpus"] < 2:
        raise PipelineError("train.fsdp shards the model over several GPUs: set train.num_gpus > 1 (or fsdp: false)")
    if cfg["backend"] == "unsloth":
        raise PipelineError("train.fsdp: unsloth does not support FSDP (its multi-GPU mode is DDP); "
                            "set train.backend: hf (or auto, which means hf with fsdp)")
    if cfg["method"] not in ("full", "lora") or cfg["load_in_4bit"]:
        raise PipelineError(f"train.fsdp shards 16/32-bit weights: method full or lora, not {cfg['method']}"
                            f"{' with load_in_4bit' if cfg['load_in_4bit'] else ''}")


def check_fsdp_tokens(cfg: dict, added) -> None:
    """FSDP2 cannot shard peft's trainable_token_indices (the rows of tokens added by train.extend_vocab or a
    chat template, tied to lm_head): seen failing in fully_shard on torch 2.13 + peft 0.21. Full fine-tuning
    trains those rows as part of the embeddings and shards fine."""
    if cfg["fsdp"] and cfg["method"] == "lora" and added:
        raise PipelineError(f"train.fsdp with method lora cannot shard the {len(added) if isinstance(added, list) else added} "
                            f"added tokens' embedding rows (peft trainable_token_indices); set train.extend_vocab: none "
                            f"(and no train.chat_template that adds tokens), or method full")


def fsdp_arguments(cfg: dict, model, gradient_checkpointing: bool) -> dict:
    """The Trainer's fsdp/fsdp_config for train.fsdp: FSDP2, one unit per decoder layer (the model's own
    _no_split_modules), a full state dict for saving; activation checkpointing done by FSDP itself."""
    if not cfg["fsdp"]:
        return {"gradient_checkpointing": gradient_checkpointing}
    layers = sorted(set(getattr(getattr(model, "get_base_model", lambda: model)(), "_no_split_modules", None) or []))
    if not layers:
        raise PipelineError(f"train.fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    config = {"version": 2, "transformer_layer_cls_to_wrap": layers, "state_dict_type": "FULL_STATE_DICT",
              "reshard_after_forward": True, "activation_checkpointing": gradient_checkpointing}
    return {"fsdp": True, "fsdp_config": config, "gradient_checkpointing": False}


def allow_fsdp_on_cpu() -> None:
    """accelerate turns FSDP on only for accelerators and silently runs DDP for CPU processes; FSDP2 itself
    runs on CPU over gloo (how the tests run train.fsdp without a GPU), so let it through there."""
    import accelerate.state
    from accelerate.utils import DistributedType

    state = accelerate.state.AcceleratorState
    if getattr(state.__init__, "fsdp_on_cpu", False):
        return
    original = state.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    init.fsdp_on_cpu = True
    state.__init__ = init


def full_state_dict(model) -> dict:
    """The whole model's weights gathered from the FSDP shards, on CPU (a collective: every process calls it;
    rank 0 saves them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (lm_head = embeddings) comes back under both names: keep the first, as save_pretrained does
    first = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - first
    return {name: value for name, value in state.items() if name not in tied}


# ----------------------------------------------------------------------------------------------
# The trainer


FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2", "kernels-community/flash-attn3")


def choose_padding_free(cfg: dict, backend: str, model) -> bool:
    """auto = padded batches grouped by length, except under flash attention (hf backend).

    Measured on an H200 (unsloth 2026.10.9, SmolLM2-135M architecture, 32k-token batches of ~215-token
    examples): padded + grouped by length 55k real tokens/s (LoRA; 74k QLoRA) once compiled, unsloth's
    padding-free path 7-8k. transformers' sdpa/eager mask flattened batches correctly (a block-diagonal
    mask from position_ids, tests/test_train_masking.py) but attend over the whole flattened batch."""
    if cfg["padding_free"] != "auto":
        return bool(cfg["padding_free"])
    attn = (getattr(model.config, "_attn_implementation", None) or "").split("@")[0].split(":")[0]
    return backend == "hf" and attn in FLASH_ATTENTION


def check_trainer_names(cfg: dict, section: str = "train") -> None:
    """<section>.lr_scheduler and <section>.optim against transformers' names (train, pretrain); called once the
    backend is chosen (importing transformers earlier would come before unsloth)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    schedulers = [s.value for s in SchedulerType]
    if cfg["lr_scheduler"] not in schedulers:
        raise PipelineError(f"{section}.lr_scheduler '{cfg['lr_scheduler']}' is unknown; choose one of: {', '.join(schedulers)}")
    optimizers = [o.value for o in OptimizerNames]
    if cfg["optim"] != "auto" and cfg["optim"] not in optimizers:
        raise PipelineError(f"{section}.optim '{cfg['optim']}' is unknown; auto or one of: {', '.join(optimizers)}")


def make_trainer_class(base):
    """The backend's SFTTrainer, counting the real (non-pad) and trained tokens of every micro-batch."""

    class CountingSFTTrainer(base):
        # running totals kept as device tensors: reading them (int()) waits for the GPU, so only the
        # logging callback does, not every step
        _tokens = 0
        _completion_tokens = 0

        @property
        def tokens_seen(self) -> int:
            return int(self._tokens)

        @property
        def completion_tokens_seen(self) -> int:
            return int(self._completion_tokens)

        def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
            if "attention_mask" in inputs:
                self._tokens = self._tokens + inputs["attention_mask"].sum()
            else:  # padding-free: one flattened row, no padding (pad_to_multiple_of is unset)
                self._tokens = self._tokens + inputs["input_ids"].numel()
            self._completion_tokens = self._completion_tokens + (inputs["labels"] != -100).sum()
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            head = self.model.get_output_embeddings()
            if inputs["input_ids"].is_cuda and fused_lm_head_available() and hasattr(head, "bias"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # trl 1.15 computes the SFT loss with a Triton kernel (fused LM head), which CPU torch lacks
            # and which reads lm_head.weight/.bias directly (not there when peft trains added token rows):
            # use the model's own loss on the same labels (summed over trained tokens / num_items_in_batch).
            from transformers import Trainer

            inputs = {**inputs, "use_cache": False}  # a cache would hide the padding-free block mask
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return CountingSFTTrainer


def fused_lm_head_available() -> bool:
    from trl.trainer import utils

    return getattr(utils, "_ChunkedLogProbFunction", None) is not None


def schedule_arguments(cfg: dict, *, rows: int, dtype, optim: str, output_dir) -> dict:
    """The SFTConfig arguments train and pretrain share: batch, steps or epochs, the optimizer and its schedule,
    seeds, precision and the device, logging."""
    import torch

    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        max_steps=cfg["max_steps"] if cfg["max_steps"] > 0 else -1,
        num_train_epochs=cfg["epochs"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type=cfg["lr_scheduler"],
        warmup_steps=cfg["warmup_steps"],
        weight_decay=cfg["weight_decay"],
        optim=optim,
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        bf16=dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        logging_steps=cfg["logging_steps"],
        logging_first_step=True,
    )


def sft_config(cfg: dict, *, rows: int, padding_free: bool, dtype, optim: str, gradient_checkpointing: bool, output_dir,
               has_valid: bool, many_examples: bool = False, model=None):
    """The trainer's SFTConfig for these settings (model None: without FSDP's layer list, for check_trainer_settings)."""
    from trl import SFTConfig

    eval_every = cfg["eval_steps"] if has_valid else 0
    return SFTConfig(
        **schedule_arguments(cfg, rows=rows, dtype=dtype, optim=optim, output_dir=output_dir),
        per_device_eval_batch_size=rows,
        **(fsdp_arguments(cfg, model, gradient_checkpointing) if model is not None
           else {"gradient_checkpointing": gradient_checkpointing}),
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every or None,
        save_strategy="steps" if cfg["save_steps"] else "no",
        save_steps=cfg["save_steps"] or 500,
        save_total_limit=cfg["save_total_limit"] or None,
        report_to="none",  # dvclive is ours (Live(dvcyaml=False)); HF would add its own callback
        disable_tqdm=True,  # our progress bar instead (make_progress_callback): HF's prints every log dict too
        eval_on_start=has_valid,  # the eval loss before the first step: a curve, not one point at the end
        dataloader_num_workers=0,
        completion_only_loss=True,  # labels from our completion_mask (trl and unsloth both honour it)
        max_length=None,  # truncated in build_examples (trl refuses max_length with padding-free)
        padding_free=padding_free,
        packing=False,
        train_sampling_strategy="random" if padding_free else "group_by_length",
        ddp_find_unused_parameters=False if world()[2] > 1 and not cfg["fsdp"] else None,  # LoRA: the frozen base has no grads
        dataset_num_proc=min(os.cpu_count() or 1, 16) if many_examples else None,
    )


def check_trainer_settings(cfg: dict, dtype, valid_path, output_dir) -> None:
    """What only transformers would reject, and only once the model has loaded and the data is tokenized: the
    trainer's arguments built from the settings now (a reduce_lr_on_plateau schedule without evaluation, an eval
    or save cadence it refuses), and the optimizer's class looked up (an optim whose package is missing). Before
    any data or model is loaded. dtype: the training dtype (loaders.resolve_dtype)."""
    import torch

    on_gpu = torch.cuda.is_available()
    optim = cfg["optim"] if cfg["optim"] != "auto" else ("adamw_8bit" if on_gpu else "adamw_torch")
    has_valid = bool(valid_path) and cfg["eval_samples"] > 0
    try:
        args = sft_config(cfg, rows=1, padding_free=cfg["padding_free"] is True, dtype=dtype,
                          optim=optim, gradient_checkpointing=False, output_dir=output_dir, has_valid=has_valid)
        from transformers import Trainer

        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ValueError, ImportError) as exc:
        message = " ".join(str(exc).split())
        if cfg["lr_scheduler"] == "reduce_lr_on_plateau" and not (has_valid and cfg["eval_steps"]):
            message = (f"train.lr_scheduler reduce_lr_on_plateau steps on the eval loss, but no evaluation runs "
                       f"(train.eval_steps {cfg['eval_steps']}, eval_samples {cfg['eval_samples']}, --valid "
                       f"{valid_path or 'not given'}); set eval_steps and eval_samples > 0, or another lr_scheduler "
                       f"(transformers: {message})")
        elif isinstance(exc, ImportError):
            message = f"train.optim {optim} needs a package that is not installed: {message}"
        raise PipelineError(f"train settings that transformers refuses: {message}") from None


def build_trainer(model, tokenizer, args, train_dataset, eval_dataset=None, callbacks=()):
    """The one trainer of train and pretrain: the backend's SFTTrainer (unsloth's, once unsloth is imported) counting
    tokens (make_trainer_class), with `args` (train: sft_config; pretrain: its own SFTConfig on schedule_arguments) on
    a datasets.Dataset: train's examples {input_ids, completion_mask} (example_dataset: the trainer turns the mask
    into labels, -100 off the reply, and its collator pads or flattens the batch) or pretrain's packed {input_ids}
    (no mask: the loss on every token)."""
    from trl import SFTTrainer

    return make_trainer_class(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def example_dataset(examples: list[dict]):
    """train's pre-tokenized examples {input_ids, completion_mask} as a datasets.Dataset; None for none (no eval)."""
    from datasets import Dataset

    return Dataset.from_list(examples) if examples else None


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_storage") or p.__class__.__name__ == "Params4bit":
            n *= 2  # bitsandbytes packs two 4-bit values a byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


