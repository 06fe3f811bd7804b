"""Train: fine-tune the base model to translate Classical Chinese into modern Chinese (LoRA, QLoRA or full).

    python -m stages.train --train data/format/train.jsonl --valid data/format/valid.jsonl \
        --out models/adapter --checkpoints models/checkpoints --reports reports/train

Inputs:  data/format/{train,valid}.jsonl, rows {"id", "book", ..., "messages": [system?, user, assistant]}.
Outputs: models/adapter       the LoRA adapter (or, for method full, the whole model) + tokenizer with its chat
                              template + training_config.json (the resolved config, train.model included, so
                              evaluate loads the same base: models.load_model(cfg["model"]) + PeftModel).
         models/checkpoints   Trainer checkpoints; train.resume continues from the last one, a fresh run clears them.
         reports/train        dvclive plots (loss, eval loss, learning rate, tokens/s by step) and summary.json.

Backends (train.backend): `unsloth` (GPU; imported lazily and before transformers/peft/trl) or `hf`
(transformers + peft + trl SFTTrainer; the CPU path). `auto` picks unsloth when CUDA is there and it imports.

Loss on the reply only, the same for both backends: each conversation is tokenized here with the chat
template, prompt = template(messages[:-1], generation prompt), full = template(messages); the completion
mask is 1 on exactly the assistant text plus its end-of-turn token (found from the template, not hard-coded)
and 0 on the prompt and anything the template adds after the end-of-turn token. SFTTrainer gets a
pre-tokenized dataset {input_ids, completion_mask} with completion_only_loss=True and turns the mask into
labels (-100 elsewhere); unsloth's dataset preparation does the same with the same columns.

Batches are sized in tokens (train.batch_tokens / mean example length = rows a micro-batch) and grouped
by length, so padding stays small; train.padding_free flattens them instead (see choose_padding_free).
On CPU the loss is the model's own (trl 1.15's fused LM-head loss needs Triton, i.e. a GPU).

Several GPUs (train.num_gpus > 1): the stage launches itself again through torchrun (data-parallel DDP,
one process per GPU) with the same arguments; both backends train that way (unsloth's DDP is what its
docs describe: one model per process on cuda:LOCAL_RANK). The batch stays global: train.batch_tokens /
batch_size are what one optimizer step sees over all GPUs, split evenly, so num_gpus changes the speed,
not the run. Only rank 0 writes reports/, the adapter and checkpoints' bookkeeping. Launched by hand
(`torchrun --nproc_per_node N -m stages.train ...`) the stage uses whatever world size torchrun gives it.
The launch helpers live in wenyan/distributed.py (evaluate shards its generation with them).

A model too big for one GPU with its batch (train.fsdp: true, with num_gpus > 1, hf backend, method full or
lora): the same processes shard its weights, gradients and optimizer state (FSDP2 through the Trainer's
fsdp/fsdp_config, one unit per decoder layer) instead of each holding a copy; rank 0 saves the whole model
gathered from the shards. tests/test_train_ddp.py runs it over two gloo processes on CPU: the same losses and
weights as DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

from wenyan import distributed, generation, models, vocab
from wenyan.prompt import (CHAT_TEMPLATES, PROMPT_SCHEMA, apply_chat_template_override, check_templates, encode_messages,
                           end_of_turn_id, end_of_turn_token, fix_special_tokens)
from wenyan.distributed import barrier, pin_one_gpu, summed, world
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.files import check_output_path, read_jsonl, replace_dir, write_json
from wenyan.params import Bool, check_params, Float, Int, ListOf, load_sections, OneOf, Param, Str

log = get_logger("train")

METHODS = ("lora", "qlora", "full")
BACKENDS = ("auto", "unsloth", "hf")
DTYPES = ("auto", "bf16", "fp16", "fp32")
LORA_BIASES = ("none", "all", "lora_only")
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2", "kernels-community/flash-attn3")
SCHEMA = {  # values and their comments: params.yaml's train: section
    "model": Str(),  # built-in name, hub id, directory or .gguf: models.resolve_model
    "backend": Str(*BACKENDS),
    "chat_template": Str(null=True),  # null or a name in CHAT_TEMPLATES
    "max_seq_length": Int(above=0),
    "max_train_samples": Int(min=0),
    "load_in_4bit": Bool(),
    "dtype": Str(*DTYPES),
    "method": Str(*METHODS),
    "lora_r": Int(above=0),
    "lora_alpha": Float(above=0),
    "lora_dropout": Float(min=0, below=1),
    "target_modules": ListOf(str),  # not empty; names of the model's modules: check_target_modules
    "lora_bias": Str(*LORA_BIASES),
    "use_rslora": Bool(),
    "gradient_checkpointing": OneOf("auto", "unsloth", True, False),
    "padding_free": OneOf("auto", True, False),
    "batch_tokens": Int(min=0),
    "batch_size": Int(above=0),
    "gradient_accumulation_steps": Int(above=0),
    "warmup_steps": Int(min=0),
    "max_steps": Int(min=0),
    "epochs": Float(min=0),  # > 0 when max_steps is 0
    "learning_rate": Float(above=0, max=1),
    "lr_scheduler": Str(),  # a transformers SchedulerType: check_trainer_names
    "weight_decay": Float(min=0),
    "optim": Str(),  # auto or a transformers OptimizerNames: check_trainer_names
    "seed": Int(min=0, max=2**32 - 1),  # numpy's range (transformers.set_seed seeds numpy too)
    "logging_steps": Int(above=0),
    "eval_steps": Int(min=0),
    "eval_samples": Int(min=0),
    "save_steps": Int(min=0),
    "save_total_limit": Int(min=0),
    "resume": Bool(),
    "num_gpus": Int(above=0),
    "fsdp": Bool(),  # shard the model over the num_gpus processes: check_fsdp
    "extend_vocab": Param((str, int)),  # auto | none | a minimum count: vocab.parse_setting (resolve_config)
}
# Keys that define what a checkpoint is; train.resume refuses a checkpoint made with other values.
RUN_IDENTITY = (
    "model", "chat_template", "method", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
    "lora_bias", "use_rslora", "max_seq_length", "max_train_samples", "batch_tokens", "batch_size",
    "gradient_accumulation_steps", "seed", "extend_vocab",
)


# ----------------------------------------------------------------------------------------------
# Parameters


def resolve_config(section: dict) -> dict:
    """Validate train: params (unknown keys, types, values, model path) before anything heavy runs."""
    cfg = check_params(section, SCHEMA, "train")
    name = cfg["chat_template"]
    if name is not None and name not in CHAT_TEMPLATES:
        raise PipelineError(
            f"train.chat_template '{name}' is unknown; choose one of: {', '.join(CHAT_TEMPLATES)} (or null)"
        )
    modules = cfg["target_modules"]
    if not modules or not all(m.strip() for m in modules) or len(set(modules)) != len(modules):
        raise PipelineError(f"train.target_modules must be a list of distinct module names (LoRA trains those), got {modules!r}")
    vocab.parse_setting(cfg["extend_vocab"])  # auto | none | a minimum count >= 1
    if cfg["max_steps"] == 0 and cfg["epochs"] <= 0:
        raise PipelineError("train.max_steps is 0, so train.epochs must be > 0")
    if cfg["method"] == "qlora":
        cfg["load_in_4bit"] = True  # qlora = LoRA on a 4-bit base
    if cfg["method"] == "full" and cfg["load_in_4bit"]:
        raise PipelineError("train.method full cannot train a 4-bit base; set load_in_4bit: false (or method qlora)")
    if cfg["resume"] and cfg["save_steps"] == 0:
        raise PipelineError("train.resume needs checkpoints: set train.save_steps > 0")
    check_fsdp(cfg)
    models.resolve_model(cfg["model"])  # a missing file or directory fails here, before any loading
    return cfg


def resolve_prompt(fmt: dict, opencc) -> dict:
    """The prompt this model is trained with, recorded in training_config.json so that evaluate, translate and
    export read it from the model, never from a params.yaml edited since: params format: and clean.opencc."""
    from wenyan import text

    fmt = check_params(fmt, PROMPT_SCHEMA, "format")
    check_templates(fmt)
    text.make_converter(opencc)  # an unknown OpenCC config fails before training, not in evaluate
    return {"format": fmt, "opencc": opencc}


def check_trainer_names(cfg: dict) -> None:
    """train.lr_scheduler and train.optim against transformers' names; called once the backend is chosen
    (importing transformers earlier would come before unsloth)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    schedulers = [s.value for s in SchedulerType]
    if cfg["lr_scheduler"] not in schedulers:
        raise PipelineError(f"train.lr_scheduler '{cfg['lr_scheduler']}' is unknown; choose one of: {', '.join(schedulers)}")
    optimizers = [o.value for o in OptimizerNames]
    if cfg["optim"] != "auto" and cfg["optim"] not in optimizers:
        raise PipelineError(f"train.optim '{cfg['optim']}' is unknown; auto or one of: {', '.join(optimizers)}")


LORA_LAYERS = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv1D")  # module classes peft's LoRA wraps


def model_modules(spec: str) -> dict[str, str]:
    """{module name: class name} of train.model, built from its config alone on the meta device (no weights are
    read: instant). A GGUF is dequantised first (models.materialize, cached), as loading it would."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    location = models.materialize(spec)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"train.model: cannot read the config of {spec} ({exc})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an architecture that cannot be built this way: loading will tell, peft will check
        log.warning("could not list the modules of %s from its config (%s); train.target_modules not checked", spec, exc)
        return {}
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def check_target_modules(cfg: dict, modules: dict[str, str]) -> None:
    """Each train.target_modules name must match a layer LoRA can wrap, as peft matches a list: the module's full
    name or its last dotted parts (q_proj, self_attn.q_proj). peft itself fails only when none matches, and
    trains the others silently otherwise."""
    if cfg["method"] == "full" or not modules:
        return
    wrappable = [name for name, kind in modules.items() if kind in LORA_LAYERS]
    unknown = [key for key in cfg["target_modules"] if not any(n == key or n.endswith("." + key) for n in wrappable)]
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind == "Linear"})
        raise PipelineError(
            f"train.target_modules: {', '.join(map(repr, unknown))} match(es) no layer of {cfg['model']}; its linear "
            f"modules are: {', '.join(linear)}"
        )


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
# Tokenization with the reply-only mask


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or len(messages) < 2:
        raise PipelineError(f"{where}: 'messages' must be a list [system?, user, assistant]")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PipelineError(f"{where}: each message needs a string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise PipelineError(f"{where}: the last message must be the assistant's reply, got role {messages[-1]['role']!r}")
    if messages[-2]["role"] != "user":
        raise PipelineError(f"{where}: the reply must follow a user message, got role {messages[-2]['role']!r}")


def tokenize_conversations(tokenizer, conversations: list[list[dict]], eot_id: int, names: list[str] | None = None):
    """Tokenize whole conversations (encode_messages: the prompt exactly as at inference); return
    [(input_ids, completion_mask, retokenized)], the mask 1 on exactly the last assistant reply plus its
    end-of-turn token, 0 on the prompt and on anything the template adds after the end-of-turn token."""
    names = names or [f"conversation {i}" for i in range(len(conversations))]
    out = []
    for name, (prompt, reply, retokenized) in zip(names, encode_messages(tokenizer, conversations, names)):
        if eot_id not in reply:
            raise PipelineError(
                f"{name}: the chat template puts no end-of-turn token ({tokenizer.convert_ids_to_tokens(eot_id)}) "
                f"after the reply, so the model could not learn to stop; use a chat template that does (train.chat_template)"
            )
        end = reply.index(eot_id) + 1  # keep the reply and its end-of-turn token, mask what follows ("\n")
        out.append((prompt + reply, [0] * len(prompt) + [1] * end + [0] * (len(reply) - end), retokenized))
    return out


PARALLEL_ROWS = 20_000  # rows per process at least before tokenizing goes parallel (the whole corpus: 543k rows)
_WORKER: tuple = ()  # (tokenizer, eot_id) for the forked tokenizing processes


def _tokenize_chunk(chunk):
    conversations, names = chunk
    tokenizer, eot_id = _WORKER
    return tokenize_conversations(tokenizer, conversations, eot_id, names)


def tokenize_in_parallel(tokenizer, conversations: list[list[dict]], eot_id: int, names: list[str]):
    """tokenize_conversations over contiguous chunks in forked processes (one per CPU core, at least
    PARALLEL_ROWS rows each), results in the input order: rendering the chat template is Python (Jinja), and
    one process takes minutes for the whole corpus, which on a lent GPU is minutes of GPU time."""
    processes = min(os.cpu_count() or 1, len(conversations) // PARALLEL_ROWS)
    if processes < 2 or "fork" not in __import__("multiprocessing").get_all_start_methods():
        return tokenize_conversations(tokenizer, conversations, eot_id, names)
    import multiprocessing

    global _WORKER
    _WORKER = (tokenizer, eot_id)
    size = -(-len(conversations) // processes)
    chunks = [(conversations[i : i + size], names[i : i + size]) for i in range(0, len(conversations), size)]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; the processes are the parallelism
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.map(_tokenize_chunk, chunks)
    finally:
        _WORKER = ()
    log.info("tokenized %d conversations in %d processes", len(conversations), processes)
    return [item for part in parts for item in part]


def tokenize_rows(tokenizer, rows: list[dict], max_seq_length: int, source: str) -> list[tuple]:
    """One (example {input_ids, completion_mask} or None, truncated, retokenized) per row, truncated to
    max_seq_length; None where truncation left no completion token (such a row is dropped, never kept with no
    loss)."""
    for i, row in enumerate(rows):
        check_messages(row.get("messages"), f"{source}:{i + 1} (id {row.get('id', '?')})")
    eot_id = end_of_turn_id(tokenizer)
    names = [f"{source} id {row.get('id', i)}" for i, row in enumerate(rows)]
    out = []
    for ids, mask, retokenized in tokenize_in_parallel(tokenizer, [row["messages"] for row in rows], eot_id, names):
        truncated = len(ids) > max_seq_length
        if truncated:
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
        keep = not truncated or any(mask)
        out.append(({"input_ids": ids, "completion_mask": mask} if keep else None, truncated, retokenized))
    return out


def build_examples(tokenizer, rows: list[dict], max_seq_length: int, source: str) -> tuple[list[dict], dict]:
    """Tokenized examples {input_ids, completion_mask} of all rows (tokenize_rows) with their stats; logged."""
    tokenized = tokenize_rows(tokenizer, rows, max_seq_length, source)
    examples = [example for example, _, _ in tokenized if example is not None]
    dropped = len(tokenized) - len(examples)
    stats = {
        "rows": len(rows),
        "retokenized_at_reply": sum(r for _, _, r in tokenized),
        "examples": len(examples),
        "dropped_truncation": dropped,
        "truncated_kept": sum(1 for e, truncated, _ in tokenized if truncated and e is not None),
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "completion_tokens": sum(sum(e["completion_mask"]) for e in examples),
    }
    if stats["retokenized_at_reply"]:
        log.info(
            "%s: %d conversations tokenize differently across the prompt/reply boundary; their reply is "
            "tokenized after the prompt's tokens, as the model produces it at inference",
            source, stats["retokenized_at_reply"],
        )
    log.info(
        "%s: kept %d/%d examples; %d dropped (prompt fills max_seq_length %d, no reply token left), "
        "%d kept with a truncated reply; %d tokens, %d of them trained (reply + end of turn)",
        source, stats["examples"], stats["rows"], dropped, max_seq_length, stats["truncated_kept"],
        stats["tokens"], stats["completion_tokens"],
    )
    return examples, stats


def rows_per_batch(lengths: list[int], batch_tokens: int, batch_size: int) -> int:
    """Batch by tokens: rows per micro-batch so that a batch holds ~batch_tokens real tokens
    (short classical sentences would otherwise leave the GPU launch-bound). batch_tokens 0 = batch_size rows."""
    if batch_tokens <= 0 or not lengths:
        return batch_size
    return max(1, int(batch_tokens / (sum(lengths) / len(lengths))))


# ----------------------------------------------------------------------------------------------
# Model loading, one function per backend


def resolve_dtype(cfg: dict, backend: str):
    import torch

    if not torch.cuda.is_available():
        if cfg["dtype"] == "bf16":  # CPU autocast; fast only where the CPU has bf16 instructions (AVX512-BF16, AMX)
            return torch.bfloat16
        if cfg["dtype"] == "fp16":
            log.warning("train.dtype fp16 ignored on CPU: training in fp32")
        return torch.float32
    if cfg["dtype"] == "auto":
        if backend == "unsloth":
            from unsloth import is_bfloat16_supported

            bf16 = is_bfloat16_supported()
        else:
            bf16 = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg["dtype"]]


def lora_kwargs(cfg: dict) -> dict:
    return dict(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=list(cfg["target_modules"]),
        bias=cfg["lora_bias"],
        use_rslora=cfg["use_rslora"],
    )


def load_unsloth(cfg: dict, dtype, texts: list[str]):
    """unsloth's FastLanguageModel: fused kernels, "unsloth" gradient checkpointing, 4-bit via bitsandbytes;
    the vocabulary extended from `texts` (train.extend_vocab) before LoRA wraps the model."""
    from unsloth import FastLanguageModel

    gc = cfg["gradient_checkpointing"]
    gc = "unsloth" if gc in ("auto", "unsloth") else bool(gc)
    extra = {}
    if world()[2] > 1:  # DDP: each process loads its copy onto its own GPU
        extra["device_map"] = {"": world()[1]}
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=models.materialize(cfg["model"]),
        max_seq_length=cfg["max_seq_length"],
        dtype=dtype,
        load_in_4bit=cfg["load_in_4bit"],
        full_finetuning=cfg["method"] == "full",
        use_gradient_checkpointing=gc,
        random_state=cfg["seed"],
        **extra,
    )
    if cfg["chat_template"]:
        from unsloth.chat_templates import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=cfg["chat_template"])
    elif not tokenizer.chat_template:
        apply_chat_template_override(tokenizer, None)  # raises: no template and none named
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        fix_special_tokens(tokenizer)
    new_ids, vocab_stats = extend_vocabulary(cfg, model, tokenizer, texts, "unsloth")
    if cfg["method"] != "full":
        model = FastLanguageModel.get_peft_model(
            model, **lora_kwargs(cfg), use_gradient_checkpointing=gc, random_state=cfg["seed"],
            max_seq_length=cfg["max_seq_length"], **vocab.lora_vocab_kwargs(model, new_ids, cfg["method"], "unsloth"),
        )
    return model, tokenizer, {"gradient_checkpointing": gc, "added_tokens": [], "vocab": vocab_stats}


def load_hf(cfg: dict, dtype, on_gpu: bool, texts: list[str]):
    """transformers + peft: the CPU path, and the GPU baseline of benchmarks/train_backends.py; the vocabulary
    extended from `texts` (train.extend_vocab) before LoRA wraps the model."""
    import torch

    tokenizer = models.load_tokenizer(cfg["model"])  # the model's own template, eos = end of turn, a pad token
    vocab_before = len(tokenizer)
    if cfg["chat_template"]:
        apply_chat_template_override(tokenizer, cfg["chat_template"])
    added = sorted(i for i in tokenizer.get_vocab().values() if i >= vocab_before)
    gc = cfg["gradient_checkpointing"]
    gc = False if gc == "auto" else bool(gc)  # "unsloth" means plain checkpointing here
    if cfg["load_in_4bit"]:
        if not on_gpu:
            raise PipelineError("train.load_in_4bit / method qlora needs a CUDA GPU (bitsandbytes); use method lora on CPU")
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(
            models.materialize(cfg["model"]), quantization_config=quant, dtype=dtype,
            device_map={"": world()[1]},
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    else:
        # full fine-tuning keeps fp32 master weights (bf16/fp16 autocast); LoRA freezes a half-precision base
        load_dtype = torch.float32 if cfg["method"] == "full" else dtype
        model = models.load_model(cfg["model"], dtype=load_dtype, device="cuda" if on_gpu else "cpu")
    if added:
        log.info("chat template %s added %d token(s): resizing the embeddings", cfg["chat_template"], len(added))
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    new_ids, vocab_stats = extend_vocabulary(cfg, model, tokenizer, texts, "hf")
    if cfg["method"] != "full":
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(cfg["seed"])  # LoRA's A matrices start random: seed them, or two runs differ from step 1

        # new rows (template tokens, whole characters) start untrained: LoRA trains exactly those rows too
        extra = vocab.lora_vocab_kwargs(model, added + new_ids, cfg["method"])
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(cfg), **extra)
        model = get_peft_model(model, peft_config)
    return model, tokenizer, {"gradient_checkpointing": gc, "added_tokens": added + new_ids, "vocab": vocab_stats}


def extend_vocabulary(cfg: dict, model, tokenizer, texts: list[str], backend: str) -> tuple[list[int], dict]:
    """train.extend_vocab: the training texts' frequent CJK characters become whole tokens (wenyan/vocab.py),
    each new embedding row the mean of its byte pieces; (new ids, stats for training_config and the summary).
    The extended tokenizer is saved with the model, so evaluate, translate and export load exactly it."""
    new_tokens, stats = vocab.decide(cfg["extend_vocab"], tokenizer, texts)
    if not new_tokens:
        return [], stats
    if backend == "unsloth" and cfg["method"] != "full":  # unsloth's add_new_tokens flags embed/lm_head to train
        return vocab.extend_unsloth(model, tokenizer, new_tokens), stats
    pieces = vocab.piece_ids(tokenizer, new_tokens)  # the base vocabulary's byte pieces, before adding
    vocab.extend_tokenizer(tokenizer, new_tokens)
    return vocab.extend_embeddings(model, tokenizer, new_tokens, pieces), stats


def training_texts(rows: list[dict]) -> list[str]:
    """Every message of the training rows, each distinct text once (the system prompt is in every row)."""
    return list(dict.fromkeys(m["content"] for row in rows for m in row["messages"] if isinstance(m, dict)
                              and isinstance(m.get("content"), str)))


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_storage") or p.__class__.__name__ == "Params4bit":
            n *= 2  # bitsandbytes packs two 4-bit values a byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# ----------------------------------------------------------------------------------------------
# Logging: dvclive (plots declared in dvc.yaml) and token counts


def peak_memory_mib() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "max RSS"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


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


class NoLive:
    step = 0
    log_metric = make_summary = end = staticmethod(lambda *args, **kwargs: None)


def staging_dir(reports: Path) -> Path:
    """Where this run's reports grow (dvclive writes as training goes) until they replace `reports` at the
    end: a run that fails or is killed leaves the last good reports/train as they were (and is git-ignored)."""
    return reports.with_name(f".{reports.name}.tmp")


def open_live(reports: Path):
    """dvclive logging into `reports` (the staging directory; dvc.yaml declares its plots; dvcyaml=False so
    it never edits dvc.yaml). Without dvclive (a bare GPU machine running benchmarks) training goes on
    without plots; under DDP only rank 0 logs."""
    if world()[0] != 0:
        return NoLive()
    try:
        from dvclive import Live
    except ImportError:
        log.warning("dvclive is not installed: no plots under %s (pip install dvclive)", reports)
        return NoLive()
    try:
        return Live(str(reports), dvcyaml=False, save_dvc_exp=False, report=None)
    except Exception as exc:  # dvclive 3.49 raises scmrepo's SCMError in a git repo with no commit yet
        if "Empty git repo" in str(exc):
            raise PipelineError("this git repository has no commit yet; commit once (git add -A && git commit) "
                                "before dvc repro, as DVC experiments need a commit too") from None
        raise


def make_progress_callback():
    """A progress bar on stderr (rank 0): training steps done of the total, elapsed and ETA, steps/s, and the
    last logged loss; a second bar while an eval runs (the CPU default's eval of 32 rows takes ~15 s)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.bar = self.eval_bar = None
            self.postfix = {}

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if self.bar is not None and ("loss" in logs or "eval_loss" in logs):
                if "loss" in logs:
                    self.postfix["loss"] = f"{logs['loss']:.4f}"
                if "eval_loss" in logs:
                    self.postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
                self.bar.set_postfix(self.postfix)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.eval_bar is None:
                total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else None
                self.eval_bar = tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
            self.eval_bar.update(1)

        def on_evaluate(self, args, state, control, **kwargs):
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressCallback()


def make_live_callback(live, trainer_ref: dict):
    from transformers import TrainerCallback

    class LiveCallback(TrainerCallback):
        """Loss, eval loss, learning rate and tokens/s per logging step into dvclive (x = step)."""

        def __init__(self):
            self.last_time = None
            self.last_tokens = 0
            self.history = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time = time.perf_counter()
            self.train_seconds = 0.0  # training time only (eval excluded), for benchmarks/train_backends.py

        def on_train_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.train_seconds += now - self.last_time  # steps after the last logged one
            self.last_time = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            trainer = trainer_ref["trainer"]
            live.step = state.global_step
            entry = {"step": state.global_step}
            if "loss" in logs:
                now = time.perf_counter()
                # under DDP: this process's share x processes (no collective here; summary.json has exact sums)
                tokens = (trainer.tokens_seen - self.last_tokens) * world()[2]
                rate = tokens / max(now - self.last_time, 1e-9)
                log.info("step %d: loss %.4f, %.0f tokens/s", state.global_step, logs["loss"], rate)
                self.train_seconds += now - self.last_time
                self.last_time, self.last_tokens = now, trainer.tokens_seen
                entry.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), tokens_per_s=rate,
                             tokens=trainer.tokens_seen * world()[2],
                             completion_tokens=trainer.completion_tokens_seen * world()[2],
                             train_seconds=self.train_seconds)
                live.log_metric("train/loss", float(logs["loss"]))
                if logs.get("learning_rate") is not None:
                    live.log_metric("train/learning_rate", float(logs["learning_rate"]))
                live.log_metric("train/tokens_per_s", round(rate, 1))
            if "eval_loss" in logs:
                entry["eval_loss"] = logs["eval_loss"]
                live.log_metric("eval/loss", float(logs["eval_loss"]))
                self.last_time = time.perf_counter()  # eval time is not training time
            if len(entry) > 1:
                self.history.append(entry)
                live.make_summary()

    return LiveCallback()


# ----------------------------------------------------------------------------------------------
# The stage


def last_checkpoint(checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def prepare_checkpoints(cfg: dict, checkpoints: Path) -> str | None:
    """Return the checkpoint to resume from, or None after clearing old checkpoints for a fresh run."""
    identity = {k: cfg[k] for k in RUN_IDENTITY}
    marker = checkpoints / "run_identity.json"
    if cfg["resume"]:
        found = last_checkpoint(checkpoints)
        if found is None:
            log.info("train.resume: no checkpoint in %s; starting from scratch", checkpoints)
        else:
            previous = json.loads(marker.read_text()) if marker.is_file() else None
            if previous is not None and previous != identity:
                diff = sorted(k for k in identity if previous.get(k) != identity[k])
                raise PipelineError(
                    f"train.resume: the checkpoints in {checkpoints} were made with other values of "
                    f"{', '.join('train.' + k for k in diff)}; set them back, or resume: false to start again"
                )
            log.info("train.resume: continuing from %s", found)
            return found
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    write_json(marker, identity)
    return None


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


def build_trainer(model, tokenizer, train_examples, valid_examples, cfg: dict, *, rows: int, padding_free: bool,
                  dtype, optim: str, gradient_checkpointing: bool, output_dir, callbacks=()):
    """SFTTrainer (unsloth's, once unsloth is imported) on the pre-tokenized examples: the trainer turns
    completion_mask into labels (-100 off the reply) and its collator pads or flattens the batch."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    eval_every = cfg["eval_steps"] if valid_examples else 0
    args = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=rows,
        per_device_eval_batch_size=rows,
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
        **fsdp_arguments(cfg, model, gradient_checkpointing),
        logging_steps=cfg["logging_steps"],
        logging_first_step=True,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every or None,
        save_strategy="steps" if cfg["save_steps"] else "no",
        save_steps=cfg["save_steps"] or 500,
        save_total_limit=cfg["save_total_limit"] or None,
        report_to="none",  # dvclive is ours (Live(dvcyaml=False)); HF would add its own callback
        disable_tqdm=True,  # our progress bar instead (make_progress_callback): HF's prints every log dict too
        eval_on_start=bool(valid_examples),  # the eval loss before the first step: a curve, not one point at the end
        dataloader_num_workers=0,
        completion_only_loss=True,  # labels from our completion_mask (trl and unsloth both honour it)
        max_length=None,  # truncated in build_examples (trl refuses max_length with padding-free)
        padding_free=padding_free,
        packing=False,
        train_sampling_strategy="random" if padding_free else "group_by_length",
        ddp_find_unused_parameters=False if world()[2] > 1 and not cfg["fsdp"] else None,  # LoRA: the frozen base has no grads
        dataset_num_proc=min(os.cpu_count() or 1, 16) if len(train_examples) >= 2 * PARALLEL_ROWS else None,
    )
    trainer = make_trainer_class(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(valid_examples) if valid_examples else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    return trainer


def read_rows(cfg: dict, train_path, valid_path) -> tuple[list[dict], list[dict]]:
    """The training rows (train.max_train_samples: a seeded sample kept in file order, so a quick run still
    covers every book) and the first train.eval_samples validation rows."""
    train_rows = read_jsonl(train_path)
    if cfg["max_train_samples"] and cfg["max_train_samples"] < len(train_rows):
        import random

        keep = sorted(random.Random(cfg["seed"]).sample(range(len(train_rows)), cfg["max_train_samples"]))
        train_rows = [train_rows[i] for i in keep]
    if not train_rows:
        raise PipelineError(f"{train_path}: no training rows")
    valid_rows = read_jsonl(valid_path)[: cfg["eval_samples"]] if valid_path and cfg["eval_samples"] else []
    return train_rows, valid_rows


def resume_point(cfg: dict, checkpoints: Path) -> str | None:
    """Rank 0 clears or checks the checkpoints (prepare_checkpoints); the other ranks follow it."""
    resume_from = prepare_checkpoints(cfg, checkpoints) if world()[0] == 0 else None
    barrier()
    if world()[0] != 0:
        resume_from = last_checkpoint(checkpoints) if cfg["resume"] else None
    return resume_from


def load_model_and_tokenizer(cfg: dict, backend: str, dtype, on_gpu: bool, train_rows: list[dict]):
    """(model ready to train (vocabulary extended from the train rows if so set, LoRA wrapped unless method
    full), tokenizer, what loading decided)."""
    texts = training_texts(train_rows)  # the train split only: never a character seen only in valid or test
    if backend == "unsloth":
        return load_unsloth(cfg, dtype, texts)
    return load_hf(cfg, dtype, on_gpu, texts)


SAMPLE_ROWS = 256  # rows tokenised to size the micro-batch when train.max_steps bounds the run (steps_examples)


def steps_examples(tokenizer, cfg: dict, rows: list[dict], source: str) -> tuple[list[dict], dict, int | None]:
    """The tokenised training examples: only those the run trains on.

    With train.max_steps > 0 a run sees max_steps x gradient_accumulation_steps micro-batches, so only that many
    rows are tokenised (the CPU default: 30 steps of a few rows, not all 28,764 pairs), drawn in a fixed order:
    the rows shuffled with train.seed, a run taking a prefix of it, kept in file order. The micro-batch size
    (train.batch_tokens / mean example length) comes from the first SAMPLE_ROWS rows of that order, tokenised
    first; a row dropped by truncation is replaced by the next one. With max_steps 0 (epochs) every row is
    tokenised, as every row is trained on. Returns (examples, stats, global rows a micro-batch, or None when the
    batch plan takes it from the examples)."""
    import random

    if cfg["max_steps"] <= 0:
        examples, stats = build_examples(tokenizer, rows, cfg["max_seq_length"], source)
        if not examples:
            raise PipelineError(f"{source}: every example was dropped by truncation; raise train.max_seq_length")
        return examples, stats, None
    order = list(range(len(rows)))
    random.Random(cfg["seed"]).shuffle(order)
    results: dict[int, tuple] = {}

    def tokenize(indices: list[int]) -> None:
        for i, result in zip(indices, tokenize_rows(tokenizer, [rows[i] for i in indices], cfg["max_seq_length"], source)):
            results[i] = result

    position = min(len(order), SAMPLE_ROWS) if cfg["batch_tokens"] > 0 else 0
    tokenize(order[:position])
    lengths = [len(r[0]["input_ids"]) for r in results.values() if r[0] is not None]
    global_rows = rows_per_batch(lengths, cfg["batch_tokens"], cfg["batch_size"])
    processes = world()[2]
    needed = cfg["max_steps"] * cfg["gradient_accumulation_steps"] * -(-global_rows // processes) * processes
    kept = [i for i in order[:position] if results[i][0] is not None]
    while len(kept) < needed and position < len(order):  # beyond the sample, or in place of dropped rows
        batch = order[position : position + needed - len(kept)]
        position += len(batch)
        tokenize(batch)
        kept += [i for i in batch if results[i][0] is not None]
    chosen = sorted(kept[:needed])  # file order, as a run over all rows
    examples = [results[i][0] for i in chosen]
    if not examples:
        raise PipelineError(f"{source}: every example was dropped by truncation; raise train.max_seq_length")
    stats = {
        "rows": position,  # tokenised
        "rows_in_split": len(rows),
        "retokenized_at_reply": sum(results[i][2] for i in chosen),
        "examples": len(examples),
        "dropped_truncation": sum(1 for r in results.values() if r[0] is None),
        "truncated_kept": sum(results[i][1] for i in chosen),
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "completion_tokens": sum(sum(e["completion_mask"]) for e in examples),
    }
    log.info("%s: tokenised %d of %d rows for train.max_steps %d (x %d rows a micro-batch x %d accumulation "
             "steps): %d examples (%d dropped at max_seq_length %d); %d tokens, %d of them trained",
             source, position, len(rows), cfg["max_steps"], global_rows, cfg["gradient_accumulation_steps"],
             len(examples), stats["dropped_truncation"], cfg["max_seq_length"], stats["tokens"],
             stats["completion_tokens"])
    return examples, stats, global_rows


def batch_plan(cfg: dict, backend: str, model, examples: list[dict], dtype, on_gpu: bool,
               global_rows: int | None = None) -> dict:
    """Rows a micro-batch per process, padding-free or not, the optimizer; logged in one line. The micro-batch
    is global: each DDP process takes its share, so a step sees the same rows whatever train.num_gpus is.
    global_rows: the micro-batch steps_examples sized the run with (else from these examples' lengths)."""
    processes = world()[2]
    lengths = [len(e["input_ids"]) for e in examples]
    mean_length = sum(lengths) / len(lengths)
    if global_rows is None:
        global_rows = rows_per_batch(lengths, cfg["batch_tokens"], cfg["batch_size"])
    rows = -(-global_rows // processes)
    plan = {"rows": rows, "processes": processes, "mean_length": mean_length,
            "padding_free": choose_padding_free(cfg, backend, model),
            "optim": cfg["optim"] if cfg["optim"] != "auto" else ("adamw_8bit" if on_gpu else "adamw_torch")}
    log.info(
        "backend %s on %s%s, %s, %s; %d rows a micro-batch (~%d tokens; mean example %.0f tokens), %s",
        backend, device_name(), f" x {processes} processes ({rows} rows each)" if processes > 1 else "",
        cfg["method"], str(dtype).replace("torch.", ""), rows * processes, rows * processes * mean_length,
        mean_length, "padding-free" if plan["padding_free"] else "padded, grouped by length",
    )
    return plan


def run_training(trainer, live_callback, resume_from, evaluate_at_end: bool) -> dict:
    """trainer.train(), then an eval at the final step if the last periodic one was earlier; the times and
    losses the summary reports."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer_time = time.perf_counter() - t0
    evals = [h for h in live_callback.history if "eval_loss" in h]
    if evaluate_at_end and not (evals and evals[-1]["step"] == trainer.state.global_step):
        trainer.evaluate()  # logged at the final step by the callback
        evals = [h for h in live_callback.history if "eval_loss" in h]
    return {"result": result, "trainer_time": trainer_time, "train_time": live_callback.train_seconds, "evals": evals,
            "train_losses": [h["loss"] for h in live_callback.history if "loss" in h]}


def resolved_config(cfg: dict, prompt: dict, backend: str, dtype, plan: dict, loaded: dict, tokenizer) -> dict:
    """training_config.json: the params as run, what auto resolved to, and the prompt the model was trained with."""
    return {
        **cfg, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "optim": plan["optim"],
        "padding_free": plan["padding_free"], "gradient_checkpointing": loaded["gradient_checkpointing"],
        "rows_per_batch": plan["rows"] * plan["processes"], "processes": plan["processes"],
        "base_model_path": models.materialize(cfg["model"]), "vocab_size": len(tokenizer),
        "added_tokens": loaded["added_tokens"], "end_of_turn_token": end_of_turn_token(tokenizer),
        "extend_vocab": loaded["vocab"],  # what train.extend_vocab decided: tokens added, tokens per character
        "saved": "model" if cfg["method"] == "full" else "adapter",
        "prompt": prompt,  # what evaluate, translate and export build their prompts from
    }


def run_summary(cfg: dict, resolved: dict, plan: dict, run: dict, trainer, stats: tuple, resume_from, start: float) -> dict:
    """reports/train/summary.json: everything about the run; headline_metrics picks what DVC compares."""
    train_stats, valid_stats = stats
    trainable, total = count_parameters(trainer.model)
    tokens_seen, completion_tokens_seen = summed(trainer.tokens_seen), summed(trainer.completion_tokens_seen)
    train_time = run["train_time"]  # training steps only: periodic evals excluded
    peak, peak_kind = peak_memory_mib()
    return {
        "backend": resolved["backend"],
        "model": cfg["model"],
        "method": cfg["method"],
        "load_in_4bit": cfg["load_in_4bit"],
        "dtype": resolved["dtype"],
        "device": device_name(),
        "processes": plan["processes"],  # DDP processes (GPUs); 1 = a plain run
        "fsdp": cfg["fsdp"],  # the model sharded over the processes (FSDP2) instead of copied (DDP)
        "trainable_params": trainable,
        "total_params": total,
        "steps": trainer.state.global_step,
        "resumed_from_step": int(Path(resume_from).name.split("-")[-1]) if resume_from else None,
        "examples": train_stats["examples"],
        "examples_dropped_truncation": train_stats["dropped_truncation"],
        "examples_truncated_kept": train_stats["truncated_kept"],
        "valid_examples": valid_stats["examples"] if valid_stats else 0,
        "rows_per_batch": resolved["rows_per_batch"],
        "mean_example_tokens": round(plan["mean_length"], 1),
        "extend_vocab": cfg["extend_vocab"],
        "added_tokens": resolved["extend_vocab"]["added"],
        "tokens_per_cjk_char": [resolved["extend_vocab"].get("tokens_per_cjk_char_before"),
                                resolved["extend_vocab"].get("tokens_per_cjk_char_after")],
        "padding_free": plan["padding_free"],
        "gradient_checkpointing": resolved["gradient_checkpointing"],
        "tokens_seen": tokens_seen,
        "completion_tokens_seen": completion_tokens_seen,
        "train_time_s": round(train_time, 1),
        "train_time_with_evals_s": round(run["trainer_time"], 1),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "tokens_per_s": round(tokens_seen / max(train_time, 1e-9), 1),
        "completion_tokens_per_s": round(completion_tokens_seen / max(train_time, 1e-9), 1),
        "peak_memory_mib": round(peak, 1),  # per GPU (rank 0's) under DDP
        "peak_memory_kind": peak_kind,
        "final_train_loss": run["train_losses"][-1] if run["train_losses"] else None,
        "mean_train_loss": run["result"].training_loss,
        "final_eval_loss": run["evals"][-1]["eval_loss"] if run["evals"] else None,
        "train_data": train_stats,
        "valid_data": valid_stats,
    }


def train(cfg: dict, train_path, valid_path, out, checkpoints, reports, callbacks=(), *, prompt: dict) -> dict:
    """Run the stage; returns the summary also written to reports/summary.json. `prompt`: resolve_prompt's,
    saved with the model. `callbacks`: extra TrainerCallbacks (tests use one to kill a run half-way)."""
    start = time.perf_counter()
    out, checkpoints, reports = Path(out), Path(checkpoints), Path(reports)
    backend = generation.pick_backend("hf" if cfg["fsdp"] else cfg["backend"])  # imports unsloth (if used) first
    check_trainer_names(cfg)
    check_target_modules(cfg, model_modules(cfg["model"]))  # from the config alone, before data and weights
    import torch

    on_gpu = torch.cuda.is_available()
    distributed.init_distributed(on_gpu, quiet=[log])
    train_rows, valid_rows = read_rows(cfg, train_path, valid_path)
    resume_from = resume_point(cfg, checkpoints)

    dtype = resolve_dtype(cfg, backend)
    model, tokenizer, loaded = load_model_and_tokenizer(cfg, backend, dtype, on_gpu, train_rows)
    check_fsdp_tokens(cfg, loaded["added_tokens"])
    train_examples, train_stats, global_rows = steps_examples(tokenizer, cfg, train_rows, str(train_path))
    valid_examples, valid_stats = (
        build_examples(tokenizer, valid_rows, cfg["max_seq_length"], str(valid_path)) if valid_rows else ([], None))
    plan = batch_plan(cfg, backend, model, train_examples, dtype, on_gpu, global_rows)

    staging = staging_dir(reports)
    if world()[0] == 0 and staging.exists():
        shutil.rmtree(staging)  # what a killed run left
    live = open_live(staging)
    trainer_ref = {}
    live_callback = make_live_callback(live, trainer_ref)
    if cfg["fsdp"] and not on_gpu:
        allow_fsdp_on_cpu()
    trainer = trainer_ref["trainer"] = build_trainer(
        model, tokenizer, train_examples, valid_examples, cfg, rows=plan["rows"], padding_free=plan["padding_free"],
        dtype=dtype, optim=plan["optim"], gradient_checkpointing=backend == "hf" and bool(loaded["gradient_checkpointing"]),
        output_dir=checkpoints, callbacks=[live_callback, make_progress_callback(), *callbacks],
    )
    if cfg["fsdp"] and not trainer.is_fsdp_enabled:  # never a silent DDP run in its place
        raise PipelineError("train.fsdp is true but accelerate did not turn FSDP on")
    trainable, total = count_parameters(trainer.model)
    log.info("trainable parameters %s / %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    run = run_training(trainer, live_callback, resume_from, evaluate_at_end=bool(valid_examples))

    resolved = resolved_config(cfg, prompt, backend, dtype, plan, loaded, tokenizer)
    state_dict = full_state_dict(trainer.model) if cfg["fsdp"] else None  # every process takes part
    if world()[0] == 0:
        save_output(trainer.model, tokenizer, resolved, out, state_dict)
    summary = run_summary(cfg, resolved, plan, run, trainer, (train_stats, valid_stats), resume_from, start)
    live.end()
    if world()[0] == 0:
        write_reports(staging, reports, summary)
    barrier()  # the adapter is on disk before any process returns
    summary["history"] = live_callback.history  # returned (benchmarks), not written: dvclive has the plots
    log.info(
        "done: %d steps, %s tokens (%s trained) in %.0f s = %.0f tokens/s; final loss %s, eval loss %s; %s %.0f MiB",
        summary["steps"], f"{summary['tokens_seen']:,}", f"{summary['completion_tokens_seen']:,}",
        summary["train_time_s"], summary["tokens_per_s"], summary["final_train_loss"], summary["final_eval_loss"],
        summary["peak_memory_kind"], summary["peak_memory_mib"],
    )
    return summary


# The run's measurements: how long, how fast, how much memory, on what. They are the one part of a run that is
# not a function of its deps and params, so they go into metrics.json only (`cache: false`, nothing depends on
# it), never into summary.json or the model (DVC-cached outputs that must hash the same in every clone).
MEASUREMENTS = ("device", "train_time_s", "train_time_with_evals_s", "wall_time_s", "tokens_per_s",
                "completion_tokens_per_s", "peak_memory_mib", "peak_memory_kind")


def write_reports(staging: Path, reports: Path, summary: dict) -> None:
    """summary.json (what the run did: a function of its inputs) and metrics.json (the headline numbers and the
    measurements) beside dvclive's plots, then the staging directory replaces reports/train: a run that failed
    before this point leaves the last good reports as they were."""
    staging.mkdir(parents=True, exist_ok=True)  # without dvclive only summary.json goes there
    write_json(staging / "summary.json", {k: v for k, v in summary.items() if k not in MEASUREMENTS})
    write_json(staging / "metrics.json", headline_metrics(staging / "metrics.json", summary))
    replace_dir(staging, reports)


def headline_metrics(live_summary: Path, summary: dict) -> dict:
    """reports/train/metrics.json, what `dvc metrics diff` and `dvc exp show` compare: the final train and eval
    loss (dvclive's last values) and the step, then the run's measurements (MEASUREMENTS: tokens/s, training and
    wall time, peak memory (peak_memory_kind: max RSS on CPU, torch's peak allocation per GPU), the device). The learning rate and the
    per-interval tokens/s stay in the plots (a metric train.learning_rate would also crowd out the param of
    that name in `dvc exp show`); everything else is in summary.json."""
    live = json.loads(live_summary.read_text(encoding="utf-8")) if live_summary.is_file() else {}
    metrics = {"train": {"loss": summary["final_train_loss"]}}
    if summary["final_eval_loss"] is not None:
        metrics["eval"] = {"loss": summary["final_eval_loss"]}
    return {**metrics, "step": live.get("step", summary["steps"]),
            **{k: summary[k] for k in ("tokens_per_s", "completion_tokens_per_s", "train_time_s", "train_time_with_evals_s",
                                       "wall_time_s", "peak_memory_mib", "peak_memory_kind", "device")}}


def save_output(model, tokenizer, resolved: dict, out: Path, state_dict: dict | None = None) -> None:
    """Adapter (or full model) + tokenizer + training_config.json into a temporary directory, then renamed.
    state_dict: the weights gathered from FSDP shards (full_state_dict), else the model's own."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    kwargs = {}
    if resolved["added_tokens"] and resolved["saved"] == "adapter":
        # the adapter's trainable_token_indices hold the rows of the added tokens: no need for whole embeddings
        kwargs["save_embedding_layers"] = False
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    model.save_pretrained(str(tmp), **kwargs)
    sort_adapter_config(tmp / "adapter_config.json")
    tokenizer.save_pretrained(str(tmp))
    write_json(tmp / "training_config.json", resolved)
    replace_dir(tmp, out)
    log.info("saved the %s to %s", resolved["saved"], out)


def sort_adapter_config(path: Path) -> None:
    """peft keeps target_modules as a set and writes it in set order, which differs from process to process
    (string hashing is salted): sorted, adapter_config.json and so models/adapter hash the same in every run."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="training JSONL (data/format/train.jsonl)")
    parser.add_argument("--valid", help="validation JSONL for the eval loss (data/format/valid.jsonl)")
    parser.add_argument("--out", required=True, help="adapter / model directory (models/adapter)")
    parser.add_argument("--checkpoints", required=True, help="checkpoint directory (models/checkpoints)")
    parser.add_argument("--reports", required=True, help="report directory (reports/train)")
    parser.add_argument("--params", help="read this params.yaml instead of asking DVC (tests, benchmarks)")
    parser.add_argument("--check-params", action="store_true", help="only check the parameters, then exit (the check_params stage)")
    args = parser.parse_args(argv)
    for path in (args.out, args.checkpoints, args.reports):
        check_output_path(path, directory=True)  # before training, not after
    params = load_sections("train", ["train", "format", "clean.opencc"], args.params)
    cfg = resolve_config(params["train"])
    prompt = resolve_prompt(params["format"], params["clean"]["opencc"])
    if args.check_params:
        check_trainer_names(cfg)  # transformers' scheduler and optimizer names (this process ends here)
        return
    if cfg["num_gpus"] > 1 and world()[2] == 1:  # relaunch under torchrun, one process per GPU
        distributed.check_gpus("train.num_gpus", cfg["num_gpus"])
        models.materialize(cfg["model"])  # a GGUF is dequantised once here, not by every process at once
        distributed.launch("stages.train", "train.num_gpus", cfg["num_gpus"], sys.argv[1:] if argv is None else list(argv))
        return
    if cfg["num_gpus"] == 1:
        pin_one_gpu()
    train(cfg, args.train, args.valid, args.out, args.checkpoints, args.reports, prompt=prompt)
    distributed.finish()


if __name__ == "__main__":
    run_main(main)
