"""Supervised fine-tuning pieces of the train stage: the data (conversations -> token ids with the reply-only mask,
examples, rows a batch) and the trainer (SFTTrainer with token counts, dvclive callback, checkpoints, FSDP).

Loss on the reply only, the same for both backends: each conversation is tokenized with the chat template
(wenyan.prompt.encode_messages: the prompt exactly as at inference); the completion mask is 1 on exactly the
assistant text plus its end-of-turn token and 0 on the prompt and anything the template adds after it.
SFTTrainer gets a pre-tokenized dataset {input_ids, completion_mask} with completion_only_loss=True and turns the
mask into labels (-100 elsewhere); unsloth's dataset preparation does the same with the same columns.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import time
from pathlib import Path

from wenyan import token_cache
from wenyan.distributed import world
from wenyan.errors import PipelineError, get_logger
from wenyan.checkpoints import identity_difference, last_complete_checkpoint, read_identity
from wenyan.files import check_owned_dir, disk_full, write_json, write_manifest
from wenyan.prompt import control_token_text, encode_messages, end_of_turn_id, end_of_turn_token

log = get_logger("sft")


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
    conversations = [row["messages"] for row in rows]
    tokenized = token_cache.cached(tokenizer, conversations, eot_id,  # tokenise once: wenyan/token_cache.py
                                   lambda c: tokenize_in_parallel(tokenizer, c, eot_id, names))
    for ids, mask, retokenized in tokenized:
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
        # texts spelling a control token (<|im_end|> in a reply): encoded as text, so the reply is trained whole
        "rows_with_control_token_text": control_token_text(tokenizer, [row["messages"] for row in rows]),
    }
    if stats["rows_with_control_token_text"]:
        log.warning("%s: %d conversation(s) spell a control token (such as %s) in their text; encoded as plain text, "
                    "never as the token", source, stats["rows_with_control_token_text"], end_of_turn_token(tokenizer))
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
    any data or model is loaded. dtype: the training dtype (models.resolve_dtype)."""
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


def build_trainer(model, tokenizer, train_examples, valid_examples, cfg: dict, *, rows: int, padding_free: bool,
                  dtype, optim: str, gradient_checkpointing: bool, output_dir, callbacks=()):
    """SFTTrainer (unsloth's, once unsloth is imported) on the pre-tokenized examples: the trainer turns
    completion_mask into labels (-100 off the reply) and its collator pads or flattens the batch."""
    from datasets import Dataset
    from trl import SFTTrainer

    args = sft_config(cfg, rows=rows, padding_free=padding_free, dtype=dtype, optim=optim,
                      gradient_checkpointing=gradient_checkpointing, output_dir=output_dir, has_valid=bool(valid_examples),
                      many_examples=len(train_examples) >= 2 * PARALLEL_ROWS, model=model)
    trainer = make_trainer_class(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(valid_examples) if valid_examples else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    return trainer


def run_training(trainer, live_callback, resume_from, evaluate_at_end: bool, *, plots=None, kept=()) -> dict:
    """trainer.train(), then an eval at the final step if the last periodic one was earlier; the times and
    losses the summary reports. A full disk meanwhile (a checkpoint, dvclive's plots in `plots`) is one error
    naming the checkpoints and saying the `kept` outputs are as they were, not a traceback."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
        trainer_time = time.perf_counter() - t0
        evals = [h for h in live_callback.history if "eval_loss" in h]
        if evaluate_at_end and not (evals and evals[-1]["step"] == trainer.state.global_step):
            trainer.evaluate()  # logged at the final step by the callback
            evals = [h for h in live_callback.history if "eval_loss" in h]
    except Exception as exc:
        if not disk_full(exc):
            raise
        raise PipelineError(f"{trainer.args.output_dir}: no space left on the device while training (saving a checkpoint "
                            f"or the plots in {plots}); {' and '.join(map(str, kept))} are as they were. Free some space "
                            f"and run again (train.resume continues from the last whole checkpoint)") from None
    return {"result": result, "trainer_time": trainer_time, "train_time": live_callback.train_seconds, "evals": evals,
            "train_losses": [h["loss"] for h in live_callback.history if "loss" in h]}


# ----------------------------------------------------------------------------------------------
# Logging: dvclive (plots declared in dvc.yaml), token counts, memory


class NoLive:
    step = 0
    log_metric = make_summary = end = staticmethod(lambda *args, **kwargs: None)


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
                # tokens/s is a measurement, not a function of deps and params: write_timings, not dvclive's plots
            if "eval_loss" in logs:
                entry["eval_loss"] = logs["eval_loss"]
                live.log_metric("eval/loss", float(logs["eval_loss"]))
                self.last_time = time.perf_counter()  # eval time is not training time
            if len(entry) > 1:
                self.history.append(entry)
                live.make_summary()

    return LiveCallback()


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_storage") or p.__class__.__name__ == "Params4bit":
            n *= 2  # bitsandbytes packs two 4-bit values a byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def write_timings(path, summary: dict, keys, history) -> None:
    """A run's measurements (how long, how fast, how much memory, on what) and its per-interval tokens/s, into path
    (reports/timings/<stage>.json): git-ignored and declared nowhere in dvc.yaml, so a rerun or a clone leaves git,
    dvc.lock and `dvc metrics diff` alone (they compare quality); `python -m tools.results` and the benchmarks
    read it. None: not written."""
    if path is None:
        return
    curve = [{"step": e["step"], "tokens_per_s": round(e["tokens_per_s"], 1)} for e in history if "tokens_per_s" in e]
    write_json(Path(path), {**{k: summary[k] for k in keys if k in summary}, "curve": curve})


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


# ----------------------------------------------------------------------------------------------
# Checkpoints (train.resume)


CHECKPOINTS_SIGNATURE = "run_identity.json"  # what marks a directory as the train stage's checkpoints
CHECKPOINT_FILES = ("checkpoint-*", "README.md")  # what the Trainer writes into --checkpoints as it goes


def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest whole checkpoint (wenyan.checkpoints.last_complete_checkpoint), or None."""
    found, _ = last_complete_checkpoint(checkpoints)
    return str(found) if found is not None else None


def prepare_checkpoints(resume: bool, checkpoints: Path, identity: dict) -> str | None:
    """Return the checkpoint to resume from, or None after clearing old checkpoints for a fresh run.

    identity (wenyan.checkpoints.run_identity: the params that change the result, the data's and the model's
    hashes, the prompt) must equal the one the checkpoints were made with; a mismatch names the keys. A
    checkpoint that is not whole (a kill -9 during its save, a truncated optimizer.pt) is removed with a
    warning and the last whole one is used. A directory holding files this stage did not write is refused."""
    marker = checkpoints / CHECKPOINTS_SIGNATURE
    check_owned_dir(checkpoints, "--checkpoints", "train", signature=CHECKPOINTS_SIGNATURE, allowed=CHECKPOINT_FILES)
    if resume:
        found, skipped = last_complete_checkpoint(checkpoints)
        for path, why in skipped:
            log.warning("train.resume: %s is incomplete (%s); removed, resuming from %s instead", path, why,
                        found.name if found else "the start")
            shutil.rmtree(path)
        if found is None:
            log.info("train.resume: no checkpoint in %s; starting from scratch", checkpoints)
        else:
            previous = read_identity(marker)
            if previous is None:
                raise PipelineError(
                    f"train.resume: {marker} is missing, so the checkpoints in {checkpoints} cannot be matched to this "
                    f"run; set train.resume: false to start again"
                )
            diff = identity_difference(previous, identity)
            if diff:
                names = [k if k.endswith(("_sha256", "fingerprint")) or k == "prompt" else f"train.{k}" for k in diff]
                raise PipelineError(
                    f"train.resume: the checkpoints in {checkpoints} were made with other values of "
                    f"{', '.join(names)}; set them back, or resume: false to start again"
                )
            log.info("train.resume: continuing from %s", found)
            return str(found)
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    write_json(marker, identity)
    write_manifest(checkpoints, "train")
    return None
