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
The library is wenyan/training/: the typed train: section (config.py), loading for training, one function per
backend (loaders.py), the SFT examples (examples.py), the trainer, callbacks, checkpoints and FSDP, and the run
itself (run.training_run, which pretrain runs too). This script reads the params, calls them in order and writes
the outputs.

Loss on the reply only, the same for both backends: each conversation is tokenized (wenyan/training/examples.py) with the chat
template, prompt = template(messages[:-1], generation prompt), full = template(messages); the completion
mask is 1 on exactly the assistant text plus its end-of-turn token (found from the template, not hard-coded)
and 0 on the prompt and anything the template adds after the end-of-turn token. SFTTrainer gets a
pre-tokenized dataset {input_ids, completion_mask} with completion_only_loss=True and turns the mask into
labels (-100 elsewhere); unsloth's dataset preparation does the same with the same columns.

Batches are sized in tokens (train.batch_tokens / mean example length = rows a micro-batch) and grouped
by length, so padding stays small; train.padding_free flattens them instead (see trainer.choose_padding_free).
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
import dataclasses
import json
import sys
import time
from pathlib import Path

from wenyan.device import pick_backend
from wenyan import distributed, models, trim, vocab
from wenyan.prompt import CHAT_TEMPLATES, PROMPT_SCHEMA, check_templates, end_of_turn_token, join_templates
from wenyan.distributed import barrier, pin_one_gpu, summed, world
from wenyan.errors import get_logger, PipelineError, run_main
from wenyan.training import loaders, trainer as training
from wenyan.training.callbacks import make_progress_callback
from wenyan.training.checkpoints import (CHECKPOINT_FILES, CHECKPOINTS_SIGNATURE, IDENTITY_PARAMS, last_checkpoint,
                                         prepare_checkpoints, run_identity)
from wenyan.training.examples import PARALLEL_ROWS, build_examples, rows_per_batch, tokenize_rows
from wenyan.training.config import TrainConfig
from wenyan.training.run import device_name, peak_memory_mib, training_run
from wenyan.files import check_output_path, check_owned_dir, check_paths, read_jsonl, staged_dir, write_json, write_manifest
from wenyan.params import add_params_options, check_machine, check_params, load_sections, schema_of

log = get_logger("train")

SCHEMA = schema_of(TrainConfig)  # params.yaml's train: section: the fields of wenyan/training/config.py
# Keys that define what a checkpoint is (TrainConfig's identity fields): train.resume refuses a checkpoint made with
# other values of these, of the train and valid data (sha256), of the base model's files or of the prompt
# (checkpoints.run_identity).
RUN_IDENTITY = IDENTITY_PARAMS
OUT_SIGNATURE, REPORTS_SIGNATURE = "training_config.json", "summary.json"  # what marks --out and --reports as ours


# ----------------------------------------------------------------------------------------------
# Parameters


def resolve_config(section: dict) -> dict:
    """Validate train: params (unknown keys, types, values, model path) before anything heavy runs; the section as
    a dict in its own key order (what training_config.json records), its values checked as a TrainConfig."""
    cfg = TrainConfig.from_section(section)
    name = cfg.chat_template
    if name is not None and name not in CHAT_TEMPLATES:
        raise PipelineError(
            f"train.chat_template '{name}' is unknown; choose one of: {', '.join(CHAT_TEMPLATES)} (or null)"
        )
    modules = cfg.target_modules
    if not modules or not all(m.strip() for m in modules) or len(set(modules)) != len(modules):
        raise PipelineError(f"train.target_modules must be a list of distinct module names (LoRA trains those), got {modules!r}")
    vocab.parse_setting(cfg.extend_vocab)  # auto | none | a minimum count >= 1
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        raise PipelineError("train.max_steps is 0, so train.epochs must be > 0")
    if cfg.method == "qlora":
        cfg = dataclasses.replace(cfg, load_in_4bit=True)  # qlora = LoRA on a 4-bit base
    if cfg.method == "full" and cfg.load_in_4bit:
        raise PipelineError("train.method full cannot train a 4-bit base; set load_in_4bit: false (or method qlora)")
    if cfg.resume and cfg.save_steps == 0:
        raise PipelineError("train.resume needs checkpoints: set train.save_steps > 0")
    values = cfg.as_dict()
    training.check_fsdp(values)
    models.resolve_model(cfg.model)  # a missing file or directory fails here, before any loading
    return {key: values[key] for key in section}


def use_pretrained(cfg: dict, pretrain_dir) -> dict:
    """train.model -> the pretrain stage's model (models/pretrain) unless that stage was a pass-through;
    training_config.json's `model` is then that directory (evaluate, translate and export load it as the
    base) and `pretrained` says what pretrain did."""
    location, info = models.resolve_pretrained(pretrain_dir, cfg["model"])
    if info["passthrough"]:
        return cfg
    log.info("base: %s (pretrained from %s by the pretrain stage)", location, cfg["model"])
    extra = {k: info.get(k) for k in ("base_model", "backend", "vocab_size", "params")}
    return {**cfg, "model": location, "pretrained": {**extra, "added_tokens": (info.get("extend_vocab") or {}).get("added")}}


def resolve_prompt(fmt: dict, opencc) -> dict:
    """The prompt this model is trained with, recorded in training_config.json so that evaluate, translate and
    export read it from the model, never from a params.yaml edited since: params format: and clean.opencc."""
    from wenyan import text

    fmt = join_templates(check_params(fmt, PROMPT_SCHEMA, "format"))
    check_templates(fmt)
    text.make_converter(opencc)  # an unknown OpenCC config fails before training, not in evaluate
    return {"format": fmt, "opencc": opencc}


# ----------------------------------------------------------------------------------------------
# The stage


def read_rows(cfg: dict, train_path, valid_path) -> tuple[list[dict], list[dict]]:
    """The training rows (train.max_train_samples: a seeded sample kept in file order, so a quick run still
    covers every book) and the first train.eval_samples validation rows. With train.max_steps, steps_examples
    then tokenises only the rows of these that the steps train on."""
    train_rows = read_jsonl(train_path)
    if cfg["max_train_samples"] and cfg["max_train_samples"] < len(train_rows):
        import random

        keep = sorted(random.Random(cfg["seed"]).sample(range(len(train_rows)), cfg["max_train_samples"]))
        train_rows = [train_rows[i] for i in keep]
    if not train_rows:
        raise PipelineError(f"{train_path}: no training rows")
    valid_rows = read_jsonl(valid_path)[: cfg["eval_samples"]] if valid_path and cfg["eval_samples"] else []
    if valid_path and cfg["eval_samples"] and not valid_rows:
        raise PipelineError(f"{valid_path}: no validation rows, but train.eval_samples is {cfg['eval_samples']}: the eval loss "
                            f"would silently be missing; give a validation split (split.valid_fraction > 0) or set "
                            f"train.eval_samples: 0")
    return train_rows, valid_rows


def resume_point(cfg: dict, checkpoints: Path, identity: dict | None = None) -> str | None:
    """Rank 0 clears or checks the checkpoints (prepare_checkpoints); the other ranks follow it. identity:
    run_identity's (default: the RUN_IDENTITY params alone)."""
    identity = identity if identity is not None else {k: cfg[k] for k in RUN_IDENTITY if k in cfg}
    resume_from = prepare_checkpoints(cfg["resume"], checkpoints, identity) if world()[0] == 0 else None
    barrier()
    if world()[0] != 0:
        resume_from = last_checkpoint(checkpoints) if cfg["resume"] else None
    return resume_from


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
            "padding_free": training.choose_padding_free(cfg, backend, model),
            "optim": cfg["optim"] if cfg["optim"] != "auto" else ("adamw_8bit" if on_gpu else "adamw_torch")}
    log.info(
        "backend %s on %s%s, %s, %s; %d rows a micro-batch (~%d tokens; mean example %.0f tokens), %s",
        backend, device_name(), f" x {processes} processes ({rows} rows each)" if processes > 1 else "",
        cfg["method"], str(dtype).replace("torch.", ""), rows * processes, rows * processes * mean_length,
        mean_length, "padding-free" if plan["padding_free"] else "padded, grouped by length",
    )
    return plan


def resolved_config(cfg: dict, prompt: dict, backend: str, dtype, plan: dict, loaded: dict, tokenizer) -> dict:
    """training_config.json: the params as run, what auto resolved to, and the prompt the model was trained with."""
    return {
        **cfg, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "optim": plan["optim"],
        "padding_free": plan["padding_free"], "gradient_checkpointing": loaded["gradient_checkpointing"],
        "rows_per_batch": plan["rows"] * plan["processes"], "processes": plan["processes"],
        "base_model_path": models.materialize(cfg["model"]), "vocab_size": len(tokenizer),
        "added_tokens": loaded["added_tokens"], "end_of_turn_token": end_of_turn_token(tokenizer),
        "extend_vocab": loaded["vocab"],  # what train.extend_vocab decided: tokens added, tokens per character
        "trim_vocab": loaded["trim"],  # what train.trim_vocab decided: trimmed or not, vocabulary sizes
        "saved": "model" if cfg["method"] == "full" else "adapter",
        "prompt": prompt,  # what evaluate, translate and export build their prompts from
    }


def run_summary(cfg: dict, resolved: dict, plan: dict, run: dict, trainer, stats: tuple, resume_from, start: float) -> dict:
    """reports/train/summary.json: everything about the run; headline_metrics picks what DVC compares."""
    train_stats, valid_stats = stats
    trainable, total = training.count_parameters(trainer.model)
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


# Long (~65 lines): one training run read top to bottom: checks, data, model, trainer, run, save, reports.
def train(cfg: dict, train_path, valid_path, out, checkpoints, reports, callbacks=(), *, prompt: dict,
          timings=None) -> dict:
    """Run the stage; returns the summary also written to reports/summary.json. `prompt`: resolve_prompt's,
    saved with the model. `callbacks`: extra TrainerCallbacks (tests use one to kill a run half-way)."""
    start = time.perf_counter()
    out, checkpoints, reports = Path(out), Path(checkpoints), Path(reports)
    backend = pick_backend("hf" if cfg["fsdp"] else cfg["backend"])  # imports unsloth (if used) first
    training.check_trainer_names(cfg, "train")
    training.check_trainer_settings(cfg, loaders.resolve_dtype(cfg["dtype"], backend), valid_path, checkpoints)  # before data and weights
    models.check_target_modules(cfg, models.model_modules(cfg["model"]))  # from the config alone, before data and weights
    import torch

    on_gpu = torch.cuda.is_available()
    distributed.init_distributed(on_gpu, quiet=[log])
    train_rows, valid_rows = read_rows(cfg, train_path, valid_path)

    dtype = loaders.resolve_dtype(cfg["dtype"], backend)
    model, tokenizer, loaded = loaders.load_for_training(cfg, backend, dtype, on_gpu, train_rows)
    training.check_fsdp_tokens(cfg, loaded["added_tokens"])
    train_examples, train_stats, global_rows = steps_examples(tokenizer, cfg, train_rows, str(train_path))
    valid_examples, valid_stats = (
        build_examples(tokenizer, valid_rows, cfg["max_seq_length"], str(valid_path)) if valid_rows else ([], None))
    plan = batch_plan(cfg, backend, model, train_examples, dtype, on_gpu, global_rows)
    # only now, with the params, the data and the model checked, does a fresh run clear the old checkpoints
    identity = run_identity(cfg, train_path, valid_path, models.materialize(cfg["model"]), prompt)
    resume_from = resume_point(cfg, checkpoints, identity)

    resolved = resolved_config(cfg, prompt, backend, dtype, plan, loaded, tokenizer)
    if cfg["fsdp"] and not on_gpu:
        training.allow_fsdp_on_cpu()

    def make_trainer(live_callback):
        args = training.sft_config(
            cfg, rows=plan["rows"], padding_free=plan["padding_free"], dtype=dtype, optim=plan["optim"],
            gradient_checkpointing=backend == "hf" and bool(loaded["gradient_checkpointing"]), output_dir=checkpoints,
            has_valid=bool(valid_examples), many_examples=len(train_examples) >= 2 * PARALLEL_ROWS, model=model)
        trainer = training.build_trainer(model, tokenizer, args, training.example_dataset(train_examples),
                                         training.example_dataset(valid_examples),
                                         callbacks=[live_callback, make_progress_callback(), *callbacks])
        if cfg["fsdp"] and not trainer.is_fsdp_enabled:  # never a silent DDP run in its place
            raise PipelineError("train.fsdp is true but accelerate did not turn FSDP on")
        trainable, total = training.count_parameters(trainer.model)
        log.info("trainable parameters %s / %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        return trainer

    def save(trainer, run):
        if world()[0] == 0:
            write_manifest(checkpoints, "train")  # what the Trainer wrote there is the stage's too
        state_dict = training.full_state_dict(trainer.model) if cfg["fsdp"] else None  # every process takes part
        if world()[0] == 0:
            save_output(trainer.model, tokenizer, resolved, out, state_dict, kept=loaded.get("kept_ids"))

    def summarize(trainer, run):
        return run_summary(cfg, resolved, plan, run, trainer, (train_stats, valid_stats), resume_from, start)

    summary = training_run("train", reports, make_trainer, save=save, summarize=summarize, headline=headline_metrics,
                           measurements=MEASUREMENTS, timings=timings, resume_from=resume_from,
                           evaluate_at_end=bool(valid_examples), kept=(out, reports))  # a full disk: one error
    barrier()  # the adapter is on disk before any process returns
    if world()[0] == 0:  # one line for the run, not one per process
        log.info(
            "done: %d steps, %s tokens (%s trained) in %.0f s = %.0f tokens/s; final loss %s, eval loss %s; %s %.0f MiB",
            summary["steps"], f"{summary['tokens_seen']:,}", f"{summary['completion_tokens_seen']:,}",
            summary["train_time_s"], summary["tokens_per_s"], summary["final_train_loss"], summary["final_eval_loss"],
            summary["peak_memory_kind"], summary["peak_memory_mib"],
        )
    return summary


# The run's measurements: how long, how fast, how much memory, on what. They are the one part of a run that is
# not a function of its deps and params, so they go into reports/timings/train.json (--timings: git-ignored, no DVC
# output), never into a DVC output: dvc.lock, metrics.json and summary.json hash the same in every clone and rerun.
MEASUREMENTS = ("device", "train_time_s", "train_time_with_evals_s", "wall_time_s", "tokens_per_s",
                "completion_tokens_per_s", "peak_memory_mib", "peak_memory_kind")


def headline_metrics(summary: dict, live: dict) -> dict:
    """reports/train/metrics.json, what `dvc metrics diff` and `dvc exp show` compare: the final train and eval
    loss (dvclive's last values, `live`) and the step, nothing measured (tokens/s, times, memory:
    reports/timings/train.json). The learning rate stays in the plots (a metric train.learning_rate would also crowd
    out the param of that name in `dvc exp show`); everything else is in summary.json."""
    metrics = {"train": {"loss": summary["final_train_loss"]}}
    if summary["final_eval_loss"] is not None:
        metrics["eval"] = {"loss": summary["final_eval_loss"]}
    return {**metrics, "step": live.get("step", summary["steps"])}


def save_output(model, tokenizer, resolved: dict, out: Path, state_dict: dict | None = None, kept=None) -> None:
    """Adapter (or full model) + tokenizer + training_config.json into a temporary directory, then renamed.
    state_dict: the weights gathered from FSDP shards (full_state_dict), else the model's own."""
    kwargs = {}
    if (resolved["added_tokens"] or kept is not None) and resolved["saved"] == "adapter":
        # the adapter's trainable_token_indices hold the rows of the added tokens, and a trimmed base is trimmed
        # again from trimmed_vocab.json when it loads: no need for whole embeddings
        kwargs["save_embedding_layers"] = False
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    with staged_dir(out, "train", signature=OUT_SIGNATURE) as tmp:
        if kept is not None:  # an adapter's base is trimmed to these ids again when it loads (models.load_trained_model)
            trim.write_kept(tmp, kept, resolved["trim_vocab"]["vocab_size_before"])
        model.save_pretrained(str(tmp), **kwargs)
        sort_adapter_config(tmp / "adapter_config.json")
        tokenizer.save_pretrained(str(tmp))
        notice = models.terms_notice(resolved)
        if notice:  # Gemma's terms travel with the model
            (tmp / models.NOTICE_FILE).write_text(notice + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(resolved, out.name, notice is not None), encoding="utf-8")  # over peft's
        write_json(tmp / OUT_SIGNATURE, resolved)
    log.info("saved the %s to %s", resolved["saved"], out)


def public_base(resolved: dict) -> str | None:
    """The hub id of the model this one was fine-tuned from, for the model card's base_model: a built-in's id
    (models.BUILTIN_HUB_IDS), through the pretrain stage's base too; a hub id as given; None for a local path (a
    model card's base_model names a model others can fetch, never a path on the trainer's disk)."""
    for name in ((resolved.get("pretrained") or {}).get("base_model"), resolved.get("model")):
        if not isinstance(name, str) or not name:
            continue
        if name in models.BUILTIN_HUB_IDS:
            return models.BUILTIN_HUB_IDS[name]
        if name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/")):
            return name
    return None


def model_card(resolved: dict, name: str, gemma: bool) -> str:
    """README.md of the trained model, in the hub's model-card form (peft writes a blank template with the local
    path of the base as base_model): what it was fine-tuned from, how, with which prompt, and how to run it.
    Only what training knows, nothing measured: the scores are the evaluate stage's (reports/metrics.json)."""
    base = public_base(resolved)
    fmt = resolved["prompt"]["format"]
    meta = ["---"]
    if base:
        meta.append(f"base_model: {base}")
    meta += [f"library_name: {'peft' if resolved['saved'] == 'adapter' else 'transformers'}",
             f"license: {'gemma' if gemma else 'apache-2.0' if base == models.BUILTIN_HUB_IDS['smollm2-135m-instruct'] else 'other'}",
             "language:", "- lzh", "- zh", "pipeline_tag: translation",
             "tags:", "- wenyan-mt", "- classical-chinese", f"- {resolved['method']}", "- sft", "---", ""]
    how = (f"{resolved['method']} (r={resolved['lora_r']}, alpha={resolved['lora_alpha']})" if resolved["method"] != "full"
           else "full fine-tuning")
    steps = f"{resolved['max_steps']} steps" if resolved["max_steps"] else f"{resolved['epochs']} epoch(s)"
    body = [
        f"# {name}: 文言文 → 现代汉语",
        "",
        f"Translates Classical Chinese into modern Chinese. Fine-tuned from {base or 'a local base model'} with "
        f"wenyan-mt ({how}, {steps}, learning rate {resolved['learning_rate']}, "
        f"{resolved['backend']} backend; loss on the translation only). Every setting is in `training_config.json`.",
        "",
        "Prompt it was trained with (`training_config.json` → `prompt`; translate and evaluate read it from there):",
        "",
        f"- system: {fmt['system_prompt'] or '(none)'}",
        f"- user: `{fmt['user_template']}`",
        "",
        "Run it:",
        "",
        "```bash",
        f"python -m tools.translate --model {name} \"学而时习之，不亦说乎？\"",
        "```",
        "",
        "Scores (BLEU/chrF against copying the source and against the base model): the evaluate stage's "
        "`reports/metrics.json` of the run that trained it.",
    ]
    if gemma:
        body += ["", "Gemma is provided under the Gemma Terms of Use: see `NOTICE.md` beside this file."]
    return "\n".join(meta + body) + "\n"


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
    parser.add_argument("--timings", help="the run's measurements (reports/timings/train.json: tokens/s, times, "
                                          "memory, device; git-ignored, no DVC output)")
    parser.add_argument("--base", help="the pretrain stage's output (models/pretrain): train starts from its model, "
                                       "or from train.model where it is a pass-through; without it, from train.model")
    add_params_options(parser)
    args = parser.parse_args(argv)
    for path in (args.out, args.checkpoints, args.reports):
        check_output_path(path, directory=True)  # before training, not after
    if args.timings:
        check_output_path(args.timings)
    outputs = {"--out": args.out, "--checkpoints": args.checkpoints, "--reports": args.reports, "--timings": args.timings}
    check_paths({"--train": args.train, "--valid": args.valid, "--base": args.base, "--params": args.params}, outputs,
                dirs=["--base"])
    params = load_sections("train", ["train", "format", "clean.opencc"], args.params)
    cfg = resolve_config(params["train"])
    # what this machine cannot run (qlora without CUDA, more GPUs than it has): here, before anything is read or
    # deleted (a fresh run clears --checkpoints before loading the model, where a 4-bit base would fail)
    check_machine({"train": cfg}, launched=world()[2] > 1)
    if args.check_params:
        resolve_prompt(params["format"], params["clean"]["opencc"])
        training.check_trainer_names(cfg, "train")  # transformers' scheduler and optimizer names (this process ends here)
        return
    if args.base:
        cfg = use_pretrained(cfg, args.base)
    location, gguf_file = models.resolve_model(cfg["model"])
    model_path = Path(location) / gguf_file if gguf_file else Path(location)
    check_paths({"train.model": model_path if model_path.exists() else None}, outputs, dirs=["train.model"])
    check_owned_dir(args.out, "--out", "train", signature=OUT_SIGNATURE)
    check_owned_dir(args.reports, "--reports", "train", signature=REPORTS_SIGNATURE)
    check_owned_dir(args.checkpoints, "--checkpoints", "train", signature=CHECKPOINTS_SIGNATURE,
                    allowed=CHECKPOINT_FILES)
    prompt = resolve_prompt(params["format"], params["clean"]["opencc"])
    if cfg["num_gpus"] > 1 and world()[2] == 1:  # relaunch under torchrun, one process per GPU
        distributed.check_gpus("train.num_gpus", cfg["num_gpus"])
        models.materialize(cfg["model"])  # a GGUF is dequantised once here, not by every process at once
        distributed.launch("stages.train", "train.num_gpus", cfg["num_gpus"], sys.argv[1:] if argv is None else list(argv))
        return
    if cfg["num_gpus"] == 1:
        pin_one_gpu()
    train(cfg, args.train, args.valid, args.out, args.checkpoints, args.reports, prompt=prompt, timings=args.timings)
    distributed.finish()


if __name__ == "__main__":
    run_main(main)
