"""Checkpoints of the train stage (train.resume); resuming never mixes runs (issue #21, class 5): what identifies a
run, and which checkpoint is whole.

run_identity: everything that changes the result of a run (data hashes, model, vocabulary, optimiser and
schedule settings, batch, prompt); train.resume refuses checkpoints made with another identity, naming the
keys. last_complete_checkpoint: the newest checkpoint whose files are all there and whole (a kill -9 in the
middle of a save, a truncated optimizer.pt), older ones after skipping those that are not, each skipped one
named with why. prepare_checkpoints: a fresh run clears --checkpoints and writes its identity there; a resumed
one checks the identity and returns the checkpoint to continue from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

from wenyan.errors import PipelineError, get_logger
from wenyan.files import check_owned_dir, sha256_file, write_json, write_manifest
from wenyan.params import identity_keys
from wenyan.training.config import TrainConfig

log = get_logger("training")

# train: params that change what a run computes: the TrainConfig fields marked identity=True (the others: logging,
# eval, save cadence, num_gpus since the batch is global, resume itself, do not)
IDENTITY_PARAMS = identity_keys(TrainConfig)


def model_fingerprint(location: str) -> str:
    """What train.model resolved to, as content: a file's size and mtime (a GGUF), a directory's config.json hash
    and its weight files' sizes and mtimes; a hub id as itself (its revision is the hub's)."""
    path = Path(location)
    if path.is_file():
        st = path.stat()
        return f"file {path.name} {st.st_size} {st.st_mtime_ns}"
    if path.is_dir():
        parts = []
        for item in sorted(path.iterdir()):
            if item.name == "config.json" or item.name.startswith("tokenizer"):
                parts.append(f"{item.name}:{sha256_file(item)[:16]}")
            elif item.suffix in (".safetensors", ".bin", ".gguf") and item.is_file():
                st = item.stat()
                parts.append(f"{item.name}:{st.st_size}:{st.st_mtime_ns}")
        return "dir " + " ".join(parts)
    return f"hub {location}"


def run_identity(cfg: dict, train_path, valid_path, model_location: str, prompt: dict | None = None) -> dict:
    """The identity train.resume compares: the params of IDENTITY_PARAMS, the train and valid files' sha256,
    the base model's fingerprint, and the prompt recorded with the model."""
    identity = {k: cfg[k] for k in IDENTITY_PARAMS if k in cfg}
    identity["train_data_sha256"] = sha256_file(train_path)
    identity["valid_data_sha256"] = sha256_file(valid_path) if valid_path else None
    identity["model_fingerprint"] = model_fingerprint(model_location)
    if prompt is not None:
        identity["prompt"] = prompt
    return json.loads(json.dumps(identity))  # as it reads back from run_identity.json (tuples -> lists)


def identity_difference(previous: dict, identity: dict) -> list[str]:
    """The keys whose values differ (or that one side lacks), sorted."""
    return sorted(k for k in set(previous) | set(identity) if previous.get(k, "<absent>") != identity.get(k, "<absent>"))


# ----------------------------------------------------------------------------------------------
# Whole checkpoints


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is whole when its header parses and its size is 8 + header + the last tensor's end."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is cut short ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is cut short (header of {n} bytes, file of {size})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        return f"{path.name} cannot be read ({exc})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is cut short ({size} bytes of {8 + n + end})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip: a file cut anywhere has no central directory at its end."""
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path.name} is damaged or cut short ({exc})"
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why a Trainer checkpoint directory is not whole, or None."""
    path = Path(path)
    match = _CHECKPOINT.match(path.name)
    state = path / "trainer_state.json"
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json (the save did not finish)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"trainer_state.json is damaged ({exc})"
    if not isinstance(data, dict) or (match and data.get("global_step") != int(match.group(1))):
        return f"trainer_state.json does not record step {match.group(1) if match else '?'}"
    weights = [path / w for w in WEIGHTS if (path / w).is_file()]
    sharded = sorted(path.glob("*.safetensors.index.json"))
    fsdp = sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith(("pytorch_model_fsdp", "optimizer_")))
    if not weights and not sharded and not fsdp:
        return "no model or adapter weights"
    for w in weights:
        problem = _safetensors_problem(w) if w.suffix == ".safetensors" else _torch_file_problem(w)
        if problem:
            return problem
    for index in sharded:
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{index.name} is damaged ({exc})"
        for shard in sorted(shards):
            problem = _safetensors_problem(path / shard) if (path / shard).is_file() else f"{shard} is missing"
            if problem:
                return problem
    for d in fsdp:  # torch.distributed.checkpoint: .metadata is written last
        if not (d / ".metadata").is_file():
            return f"{d.name}/.metadata is missing (the save did not finish)"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file():
            if name == "optimizer.pt" and any(d.name.startswith("optimizer_") for d in fsdp):
                continue
            return f"no {name} (the save did not finish)"
        problem = _torch_file_problem(path / name)
        if problem:
            return problem
    for rng in sorted(path.glob("rng_state*.pth")):
        problem = _torch_file_problem(rng)
        if problem:
            return problem
    return None


def checkpoints_newest_first(checkpoints: str | os.PathLike) -> list[Path]:
    directory = Path(checkpoints)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(checkpoints: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest whole checkpoint or None, [(newer checkpoint skipped, why)])."""
    skipped = []
    for path in checkpoints_newest_first(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def read_identity(marker: Path) -> dict | None:
    """run_identity.json, or None when absent; damaged is an error naming it."""
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{marker}: damaged ({exc}); the checkpoints beside it cannot be matched to a run: "
                            f"set train.resume: false to start again") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{marker}: should be a mapping of the run's settings, got {type(data).__name__}; "
                            f"set train.resume: false to start again")
    return data


# ----------------------------------------------------------------------------------------------
# The checkpoint directory (train.resume)


CHECKPOINTS_SIGNATURE = "run_identity.json"  # what marks a directory as the train stage's checkpoints
CHECKPOINT_FILES = ("checkpoint-*", "README.md")  # what the Trainer writes into --checkpoints as it goes


def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest whole checkpoint (last_complete_checkpoint), or None."""
    found, _ = last_complete_checkpoint(checkpoints)
    return str(found) if found is not None else None


def prepare_checkpoints(resume: bool, checkpoints: Path, identity: dict) -> str | None:
    """Return the checkpoint to resume from, or None after clearing old checkpoints for a fresh run.

    identity (run_identity: the params that change the result, the data's and the model's
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
