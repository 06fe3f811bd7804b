"""Pretrain: continued causal-LM pretraining of the base model on monolingual classical Chinese (issue 20).

    python -m stages.pretrain --base models/base --split-dir data/split --out models/pretrain \
        --reports reports/pretrain          (what `dvc repro pretrain` runs; tests add --params FILE)

Between `base` and `train`: the model meets classical Chinese as plain text before it learns to translate,
the way classical-Chinese models are pretrained. `train` takes models/pretrain as its base.

Inputs:  models/base (base.json: where train.model resolved to), data/split/{train,valid,test}.parquet, and
         the sources of params.yaml `pretrain.sources`, each a `path` in one of three formats:
           niutrans  the NiuTrans `古文原文` layout, a directory or a streamed .tar/.tar.gz/.tar.xz/.zip:
                       [<top>/][古文原文/]<book>/<part>/.../<chapter>/text.txt   one paragraph a line;
                     one chapter is one document (books: [] = all, or a list of book names)
           text      a plain text file, or a directory/archive of *.txt files: documents separated by blank lines
           jsonl     one JSON object a line, the document in its `field` (default "text")
         The archive reader is ingest's (wenyan/archives.py) (the same rules: streamed, links read only inside the archive or
         directory, a FIFO/device/dangling link/oversized file never opened and counted by reason in the
         report; a cut or damaged archive is one `error:` line; a file that is not valid in its `encoding`
         is one `error:` line naming the file and line, as in ingest).
Outputs: models/pretrain      the pretrained model (all weights) + tokenizer (extended by pretrain.extend_vocab)
                              + pretrain.json; or, when the stage is a pass-through, pretrain.json alone
         reports/pretrain     metrics.json (tokens, tokens/s, final loss, wall time), data.json (texts read,
                              skipped by reason, removed for valid/test overlap, characters, tokens, sequences),
                              summary.json (everything about the run), plots/metrics (dvclive loss curves)

Reading, text and packing live in wenyan/monolingual.py.

Text: HTML tags in the corpus (<strong>, <br/>, <span ...>: ~28k in classical-mono-a) are removed (<br/> is
a line break), then every line is normalised exactly as the clean stage normalises a pair (wenyan/text.py:
NFC, control characters, whitespace, full-width punctuation, OpenCC with clean.opencc). pretrain.include_train_split
adds the train split's sources and targets (one document a chapter and side).

Never a valid or test sentence: every line is cut into sentences (after 。！？； and closing quotes); a sentence
whose letters and digits (split's leakage key: punctuation and spaces dropped) equal those of a valid/test
sentence or line, on either side, is removed, and counted (data.json: removed_for_overlap). Text that is
only valid/test text leaves nothing, which is an error, as is no text at all.

Packing: each document is tokenized alone (no special tokens), documents are joined with the tokenizer's
EOS token (eos = the chat template's end-of-turn token, as modeling sets it; the SFT stop token) into one
stream, cut into sequences of exactly pretrain.max_seq_length tokens; the tail shorter than that is dropped
(counted), so there is no padding. Attention runs across document boundaries inside a sequence, as in
ordinary LM pretraining. pretrain.max_tokens > 0 keeps a seeded random choice of that many tokens' sequences.

Training: all weights (full causal-LM loss on every token, no chat template), through train's own loaders
(wenyan/training/loaders.py: load_unsloth with full_finetuning on GPU, load_hf on CPU, given a Loading of this
section's values; pretrain.backend as train.backend), train's trainer and run (wenyan/training/: one
build_trainer, one training_run),
the vocabulary extended there first (pretrain.extend_vocab, the semantics of train.extend_vocab; characters
counted from the pretraining text + the train split, never valid/test), so train's own extend_vocab finds
~1 token a character and adds nothing. One optimizer step sees pretrain.batch_tokens tokens
(batch_tokens / max_seq_length sequences, split into gradient_accumulation_steps micro-batches). No
checkpoints: a killed run starts again; the loss curve is written as training goes (dvclive, in
a directory of its own beside reports/pretrain until the end).

Outputs are this stage's own: --out and --reports carry a manifest naming the stage; a directory another stage
wrote (models/adapter, models/base: their manifests say so), one holding files this stage did not write, a
symbolic link, or a path that is, holds or lies inside an input (--base, --split-dir, a source) is refused,
one line naming it, before anything is read.

Pass-through: pretrain.enabled false, or pretrain.max_steps 0 with pretrain.epochs 0 (zero tokens), writes
models/pretrain/pretrain.json {"passthrough": true} and small reports in well under a second, reads no
source and loads no model; train then starts from models/base (train.model) as it would without this stage.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import tempfile

import shutil
import time
from pathlib import Path

from wenyan.device import pick_backend
from wenyan import archives, corpora, monolingual, text, vocab
from wenyan.errors import PipelineError, get_logger, run_main
from wenyan.files import (check_output_path, check_owned_dir, check_paths, new_staging_dir, read_pairs, staged_dir,
                          with_path_errors, write_json)
from wenyan.params import add_params_options, check_entry, load_sections, named_entries, schema_of
from wenyan.training import loaders, trainer as training
from wenyan.training.config import PretrainConfig
from wenyan.training.run import device_name, peak_memory_mib, training_run, write_reports

log = get_logger("pretrain")
OUT_SIGNATURE, REPORTS_SIGNATURE = "pretrain.json", "summary.json"  # what marks --out and --reports as ours

SCHEMA = schema_of(PretrainConfig)  # params.yaml's pretrain: section: the fields of wenyan/training/config.py


# ----------------------------------------------------------------------------------------------
# Parameters


def resolve_config(section: dict) -> dict:
    """Validate pretrain: params before anything is read; sources are checked only when the stage runs."""
    values = PretrainConfig.from_section(section).as_dict()  # checked against the typed section
    cfg = {key: values[key] for key in section}  # in the section's order (pretrain.json records it)
    try:
        vocab.parse_setting(cfg["extend_vocab"])
    except PipelineError as exc:
        raise PipelineError(str(exc).replace("train.extend_vocab", "pretrain.extend_vocab")) from None
    if cfg["optim"] != "auto" and not cfg["optim"].strip():
        raise PipelineError("pretrain.optim must be auto or a transformers optimizer name")
    return cfg


def is_passthrough(cfg: dict) -> str | None:
    """Why the stage does nothing (enabled false, or a zero budget), or None when it trains."""
    if not cfg["enabled"]:
        return "pretrain.enabled is false"
    if cfg["max_steps"] == 0 and cfg["epochs"] == 0:
        return "pretrain.max_steps and pretrain.epochs are 0 (zero tokens)"
    return None


def check_sources(cfg: dict) -> list[dict]:
    if not cfg["sources"]:
        raise PipelineError("params.yaml 'pretrain.sources' is empty; list at least one {path, format} "
                            "(or set pretrain.enabled: false)")
    sources = []
    for where, entry in named_entries(cfg["sources"], "pretrain.sources"):
        src = check_entry(entry, {**monolingual.SOURCE_DEFAULTS, "name": ""}, where)
        if not src["path"]:
            raise PipelineError(f"params.yaml '{where}' has no path")
        if src["format"] not in monolingual.FORMATS:
            raise PipelineError(f"params.yaml '{where}.format' should be one of {', '.join(monolingual.FORMATS)}, got {src['format']!r}")
        archives.check_encoding(src["encoding"], where, src["path"])
        if not isinstance(src["books"], list) or not all(isinstance(b, str) for b in src["books"]):
            raise PipelineError(f"params.yaml '{where}.books' should be a list of book names")
        if src["books"] and src["format"] != "niutrans":
            raise PipelineError(f"params.yaml '{where}.books' filters books of the niutrans layout only")
        if not isinstance(src["field"], str) or not src["field"]:
            raise PipelineError(f"params.yaml '{where}.field' should be the JSON key holding the text")
        if not os.path.lexists(src["path"]):
            raise PipelineError(f"{src['path']}: not found (params.yaml {where}.path)")
        sources.append(src)
    return sources




def choose_rows(rows: int, cfg: dict) -> list[int] | None:
    """pretrain.max_tokens: a seeded random choice of whole sequences (None = all)."""
    if not cfg["max_tokens"]:
        return None
    keep = cfg["max_tokens"] // cfg["max_seq_length"]
    if keep >= rows:
        return None
    if keep == 0:
        raise PipelineError(f"pretrain.max_tokens {cfg['max_tokens']} is less than one sequence of "
                            f"pretrain.max_seq_length {cfg['max_seq_length']} tokens; raise it, or set 0 for all")
    return sorted(random.Random(cfg["seed"]).sample(range(rows), keep))


def micro_batch_rows(cfg: dict) -> int:
    """Sequences a micro-batch: batch_tokens / (max_seq_length x gradient_accumulation_steps), exactly."""
    per_step = cfg["max_seq_length"] * cfg["gradient_accumulation_steps"]
    if cfg["batch_tokens"] % per_step:
        raise PipelineError(
            f"pretrain.batch_tokens {cfg['batch_tokens']} must be a multiple of pretrain.max_seq_length x "
            f"gradient_accumulation_steps = {per_step} (a step is whole sequences)")
    return cfg["batch_tokens"] // per_step


# ----------------------------------------------------------------------------------------------
# The data: read, normalise, remove valid/test, add the train split


def build_corpus(cfg: dict, split_dir: Path, opencc) -> tuple[list, list[str], dict]:
    """(documents to pretrain on, texts for the vocabulary (pretraining text + train split), data report)."""
    converter = text.make_converter(opencc)
    sources = check_sources(cfg)
    frames = {s: read_pairs(split_dir / f"{s}.parquet", "split") for s in ("train", "valid", "test")}
    keys = monolingual.held_out_keys([frames["valid"], frames["test"]])
    report_sources, docs, norm_counts = [], [], {}
    for src in sources:
        stats = monolingual.Stats()
        read = monolingual.read_source(src, stats)
        stats.documents, stats.lines = len(read), sum(len(lines) for _, lines in read)
        chars_read = sum(len(s) for _, lines in read for s in lines)
        normal = monolingual.normalise_documents(read, converter, norm_counts)
        docs.extend(normal)
        entry = {**({"name": src["name"]} if src["name"] else {}), "path": src["path"], "format": src["format"],
                 "books_filter": src["books"], **stats.report(),
                 "characters_read": chars_read,
                 "characters_normalised": sum(len(s) for _, lines in normal for s in lines)}
        report_sources.append(entry)
        log.info("%s: %s documents, %s lines, %s characters; read %s files, skipped %s%s", src["path"],
                 f"{stats.documents:,}", f"{stats.lines:,}", f"{chars_read:,}", f"{stats.files_read:,}",
                 stats.files_skipped, f" ({', '.join(f'{n} {r}' for r, n in stats.skipped_by_reason.items())})"
                 if stats.files_skipped else "")
    read_chars = sum(len(s) for _, lines in docs for s in lines)
    if read_chars == 0:
        raise PipelineError("pretrain read no text at all from pretrain.sources "
                            f"({', '.join(s['path'] for s in sources)}); see the skipped files above")
    overlap = collections.Counter()
    mono = monolingual.remove_overlap(docs, keys, overlap)
    train_docs, train_overlap = [], collections.Counter()
    if cfg["include_train_split"]:
        train_docs = monolingual.remove_overlap(monolingual.train_split_documents(frames["train"]), keys, train_overlap)
    corpus = mono + train_docs
    chars = sum(len(s) for _, lines in corpus for s in lines)
    if chars == 0:
        raise PipelineError(
            f"every sentence of pretrain.sources ({overlap['sentences']:,}) appears in the valid or test split, so "
            f"nothing is left to pretrain on; pretraining on valid/test text would leak it into the scores")
    vocab_texts = [s for _, lines in mono for s in lines]
    vocab_texts += frames["train"]["source"].tolist() + frames["train"]["target"].tolist()
    log.info("valid/test overlap: removed %s of %s sentences (%s characters) from the sources%s",
             f"{overlap['sentences_removed']:,}", f"{overlap['sentences']:,}", f"{overlap['characters_removed']:,}",
             f", {train_overlap['sentences_removed']:,} from the train split" if cfg["include_train_split"] else "")
    report = {
        "sources": report_sources,
        "documents_read": len(docs),
        "characters_read": read_chars,
        "normalisation": norm_counts,
        "held_out_keys": len(keys),
        "removed_for_overlap": {"sources": dict(overlap), "train_split": dict(train_overlap)},
        "include_train_split": cfg["include_train_split"],
        "train_split_documents": len(train_docs),
        "train_split_characters": sum(len(s) for _, lines in train_docs for s in lines),
        "documents": len(corpus),
        "characters": chars,
    }
    return corpus, vocab_texts, report


# ----------------------------------------------------------------------------------------------
# Training


def base_location(base_dir: Path) -> tuple[str, dict]:
    """(what from_pretrained loads, base.json) from the base stage's output."""
    path = base_dir / "base.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the base stage first (dvc repro base)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc}); run the base stage again (dvc repro base)") from None
    if not isinstance(info, dict) or not info.get("location"):
        raise PipelineError(f"{path}: has no 'location'; run the base stage again (dvc repro base)")
    return info["location"], info


def base_read(base_dir: Path) -> dict:
    """The model base.json points at, where it exists: an input too (never an output target)."""
    try:
        location = json.loads((base_dir / "base.json").read_text(encoding="utf-8")).get("location")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    return {"--base's model": Path(location)} if isinstance(location, str) and Path(location).exists() else {}


def loading(cfg: dict, location: str) -> loaders.Loading:
    """What train's loaders read, from this section: full fine-tuning of `location` (all weights, no LoRA, not 4-bit),
    no chat template (plain text), no trimming, the vocabulary extended as pretrain.extend_vocab says."""
    return loaders.Loading(model=location, max_seq_length=cfg["max_seq_length"], method="full", load_in_4bit=False,
                           gradient_checkpointing=cfg["gradient_checkpointing"], seed=cfg["seed"], chat_template=None,
                           extend_vocab=cfg["extend_vocab"])


def trainer_arguments(cfg: dict, *, rows: int, dtype, optim: str, gradient_checkpointing: bool, output_dir):
    """The SFTConfig of training.build_trainer for the packed sequences: train's schedule (schedule_arguments), no
    eval and no checkpoints, no completion mask (so the loss is on every token), no padding (every row is
    max_seq_length long)."""
    from trl import SFTConfig

    return SFTConfig(
        **training.schedule_arguments(cfg, rows=rows, dtype=dtype, optim=optim, output_dir=output_dir),
        gradient_checkpointing=gradient_checkpointing,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        completion_only_loss=False,
        max_length=None,
        padding_free=False,
        packing=False,  # packed here already, into rows of exactly max_seq_length
        train_sampling_strategy="random",
        dataset_num_proc=None,
    )


def make_dataset(sequences):
    """A datasets.Dataset of {input_ids: [max_seq_length ints]} straight from the int32 array (Arrow, no lists)."""
    import pyarrow as pa
    from datasets import Dataset

    flat = pa.array(sequences.reshape(-1).astype("int64"))
    column = pa.FixedSizeListArray.from_arrays(flat, sequences.shape[1]).cast(pa.list_(pa.int64()))
    return Dataset(pa.table({"input_ids": column}))


# Long (~90 lines): the stage's run read top to bottom: corpus, vocabulary, model, trainer, training, summary.
def pretrain(cfg: dict, opencc, base_dir, split_dir, out, reports, callbacks=(), timings=None) -> dict:
    """Run the stage (not a pass-through); returns the summary also written to reports/summary.json."""
    start = time.perf_counter()
    out, reports, split_dir = Path(out), Path(reports), Path(split_dir)
    location, base_info = base_location(Path(base_dir))
    rows = micro_batch_rows(cfg)
    backend = pick_backend(cfg["backend"])  # imports unsloth (if used) before transformers
    training.check_trainer_names(cfg, "pretrain")
    import torch

    on_gpu = torch.cuda.is_available()
    corpus, vocab_texts, data = build_corpus(cfg, split_dir, opencc)

    dtype = loaders.resolve_dtype(cfg["dtype"], backend)
    if backend == "unsloth":  # train's loaders: full fine-tuning, the vocabulary extended from vocab_texts
        model, tokenizer, loaded = loaders.load_unsloth(loading(cfg, location), dtype, vocab_texts)
    else:
        model, tokenizer, loaded = loaders.load_hf(loading(cfg, location), dtype, on_gpu, vocab_texts)
    del vocab_texts
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise PipelineError(f"{location}: the tokenizer has no EOS token to join documents with")
    t0 = time.perf_counter()
    token_lists = monolingual.tokenize_documents(tokenizer, corpus)
    tokenize_s = time.perf_counter() - t0
    sequences, stream_tokens, tail = monolingual.pack(token_lists, eos_id, cfg["max_seq_length"])
    del token_lists
    if len(sequences) == 0:
        raise PipelineError(f"the pretraining text is {stream_tokens:,} tokens, less than one sequence of "
                            f"pretrain.max_seq_length {cfg['max_seq_length']}; add text or lower max_seq_length")
    chosen = choose_rows(len(sequences), cfg)
    packed_rows = len(sequences)
    if chosen is not None:
        sequences = sequences[chosen]
    data.update(tokens=stream_tokens, tokens_per_character=round(stream_tokens / data["characters"], 4),
                sequences=packed_rows, sequence_length=cfg["max_seq_length"], tail_tokens_dropped=tail,
                sequences_used=len(sequences), eos_token=tokenizer.convert_ids_to_tokens(eos_id),
                vocabulary=loaded["vocab"])
    log.info("packed %s tokens (%.3f a character) into %s sequences of %d (%d tail tokens dropped)%s",
             f"{stream_tokens:,}", data["tokens_per_character"], f"{packed_rows:,}", cfg["max_seq_length"], tail,
             f"; pretrain.max_tokens keeps {len(sequences):,}" if chosen is not None else "")
    dataset = make_dataset(sequences)
    optim = cfg["optim"] if cfg["optim"] != "auto" else ("adamw_torch_fused" if on_gpu else "adamw_torch")

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.trainer-", suffix=".tmp", dir=out.parent))  # the Trainer's output_dir: nothing is saved there
    gradient_checkpointing = backend == "hf" and bool(loaded["gradient_checkpointing"])
    pretrained = {
        "passthrough": False, "base_model": base_info.get("model"), "base_location": location, "backend": backend,
        "dtype": str(dtype).replace("torch.", ""), "vocab_size": len(tokenizer), "extend_vocab": loaded["vocab"],
        "params": cfg, "opencc": opencc,
    }

    def make_trainer(live_callback):
        args = trainer_arguments(cfg, rows=rows, dtype=dtype, optim=optim, gradient_checkpointing=gradient_checkpointing,
                                 output_dir=scratch)
        trainer = training.build_trainer(model, tokenizer, args, dataset, callbacks=[live_callback, *callbacks])
        trainable, total = training.count_parameters(trainer.model)
        log.info("backend %s on %s, %s, full (%s / %s parameters trained); %d sequences a micro-batch x %d = %d tokens a step",
                 backend, device_name(), str(dtype).replace("torch.", ""), f"{trainable:,}", f"{total:,}", rows,
                 cfg["gradient_accumulation_steps"], cfg["batch_tokens"])
        return trainer

    def save(trainer, run):
        if scratch.exists():
            shutil.rmtree(scratch)
        save_model(trainer.model, tokenizer, pretrained, out)

    def summarize(trainer, run):
        tokens, losses = trainer.tokens_seen, run["train_losses"]
        trainable, total = training.count_parameters(trainer.model)
        peak, peak_kind = peak_memory_mib()
        train_time = run["train_time"] or run["trainer_time"]
        return {
            "backend": backend, "device": device_name(), "dtype": pretrained["dtype"], "base_model": base_info.get("model"),
            "trainable_params": trainable, "total_params": total, "steps": trainer.state.global_step,
            "sequences_a_step": rows * cfg["gradient_accumulation_steps"], "tokens": tokens,
            "train_time_s": round(train_time, 1), "wall_time_s": round(time.perf_counter() - start, 1),
            "tokens_per_s": round(tokens / max(train_time, 1e-9), 1), "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None, "mean_loss": run["result"].training_loss,
            "peak_memory_mib": round(peak, 1), "peak_memory_kind": peak_kind, "optim": optim,
            "gradient_checkpointing": loaded["gradient_checkpointing"], "added_tokens": loaded["vocab"].get("added"),
            "data": data, "tokenize_seconds": round(tokenize_s, 1),
        }

    summary = training_run("pretrain", reports, make_trainer, save=save, summarize=summarize, headline=headline,
                           measurements=MEASUREMENTS, timings=timings, extra_reports={"data.json": data})
    log.info("done: %d steps, %s tokens in %.0f s = %.0f tokens/s; loss %s -> %s; %s %.0f MiB",
             summary["steps"], f"{summary['tokens']:,}", summary["train_time_s"], summary["tokens_per_s"],
             summary["first_loss"], summary["final_loss"], summary["peak_memory_kind"], summary["peak_memory_mib"])
    return summary


def save_model(model, tokenizer, info: dict, out: Path) -> None:
    with staged_dir(out, "pretrain", signature=OUT_SIGNATURE) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / OUT_SIGNATURE, info)
    log.info("saved the pretrained model to %s", out)


# The run's measurements: reports/timings/pretrain.json (--timings: git-ignored, no DVC output), never summary.json
# or metrics.json, so that every DVC output hashes the same in every clone and rerun (the curve: in the same file).
MEASUREMENTS = ("device", "train_time_s", "wall_time_s", "tokens_per_s", "peak_memory_mib", "peak_memory_kind",
                "tokenize_seconds")


def headline(summary: dict, live: dict | None = None) -> dict:
    """reports/pretrain/metrics.json: what `dvc metrics diff` compares (nothing measured: reports/timings/)."""
    return {"tokens": summary["tokens"], "loss": summary["final_loss"], "steps": summary["steps"]}


def passthrough(reason: str, out: Path, reports: Path) -> None:
    """A marker directory (train resolves it to models/base) and small reports; nothing is read or loaded."""
    log.info("pass-through (%s): train starts from models/base", reason)
    with staged_dir(out, "pretrain", signature=OUT_SIGNATURE) as tmp:
        write_json(tmp / OUT_SIGNATURE, {"passthrough": True, "reason": reason})
    staging = new_staging_dir(reports)
    summary = {"passthrough": True, "reason": reason, "tokens": 0, "final_loss": None, "steps": 0}
    write_reports(staging, reports, "pretrain", summary, headline, MEASUREMENTS,
                  {"data.json": {"passthrough": True, "reason": reason}})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the base stage's output (models/base)")
    parser.add_argument("--split-dir", required=True, help="train/valid/test.parquet (data/split)")
    parser.add_argument("--out", required=True, help="model directory to write (models/pretrain)")
    parser.add_argument("--reports", required=True, help="report directory (reports/pretrain)")
    parser.add_argument("--timings", help="the run's measurements (reports/timings/pretrain.json: tokens/s, times, "
                                          "memory, device; git-ignored, no DVC output)")
    add_params_options(parser)
    args = parser.parse_args(argv)
    for path in (args.out, args.reports):
        check_output_path(path, directory=True)
    if args.timings:
        check_output_path(args.timings)
    inputs = {"--base": args.base, "--split-dir": args.split_dir, "--params": args.params, **base_read(Path(args.base))}
    outputs = {"--out": args.out, "--reports": args.reports, "--timings": args.timings}
    check_paths(inputs, outputs, dirs=["--base", "--split-dir", "--base's model"])  # never an output onto an input (the base model too) or the other output
    check_owned_dir(args.out, "--out", "pretrain", signature=OUT_SIGNATURE)  # before anything is read or trained
    check_owned_dir(args.reports, "--reports", "pretrain", signature=REPORTS_SIGNATURE)
    params = load_sections("pretrain", ["pretrain", "clean.opencc"], args.params)
    cfg = resolve_config(params["pretrain"])
    reason = is_passthrough(cfg)
    if args.check_params:
        text.make_converter(params["clean"]["opencc"])  # a clean.opencc typo fails here too
        if not reason:  # a pass-through reads no source and trains nothing: its sources and names are not used
            check_sources(cfg)
            micro_batch_rows(cfg)  # batch_tokens a multiple of max_seq_length x gradient_accumulation_steps
            training.check_trainer_names(cfg, "pretrain")  # transformers' scheduler and optimizer names
        return
    if reason:
        passthrough(reason, Path(args.out), Path(args.reports))
        return
    checked = check_sources(cfg)
    for src in checked:  # a thousand-level directory tree: one error, not a RecursionError in the walk
        if os.path.isdir(src["path"]):
            corpora.check_depth(Path(src["path"]))
    sources = {f"pretrain.sources{'.' + src['name'] if src['name'] else f'[{i}]'}": src["path"]
               for i, src in enumerate(checked)}
    check_paths(sources, outputs, dirs=list(sources))  # nor onto a source of the text
    pretrain(cfg, params["clean"]["opencc"], args.base, args.split_dir, args.out, args.reports, timings=args.timings)


if __name__ == "__main__":
    run_main(with_path_errors(main))
