"""Paths given to one command, checked against each other before any work (issue #21, class 1).

No output may be an input, contain one or sit inside one, nor be, contain or sit inside another output,
under any spelling: relative or absolute, `..`, a symlink anywhere on the way (compared as realpaths), a
hard link or a bind mount (compared by (st_dev, st_ino) of the file and of every directory above it).

A directory output that a stage replaces as a whole (train's --out, --reports and --checkpoints, base's and
export's --out) carries a manifest of what the stage wrote (MANIFEST); a directory already there that
holds anything else is refused, never emptied.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

from stages.common import PipelineError, disk_full, get_logger, replace_dir

log = get_logger("files")

MANIFEST = ".wenyan-outputs.json"  # {"stage": ..., "files": [relative posix paths]}: what the stage wrote


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def relation(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """'is', 'inside' (a lies within b), 'contains' (b lies within a) or None: a and b compared as realpaths
    and by (st_dev, st_ino) of each and of the directories above them (hard links, bind mounts)."""
    ra, rb = _real(a), _real(b)
    ia, ib = _identity(ra), _identity(rb)
    if ra == rb or (ia is not None and ia == ib):
        return "is"
    if rb in ra.parents or (ib is not None and any(_identity(p) == ib for p in ra.parents)):
        return "inside"
    if ra in rb.parents or (ia is not None and any(_identity(p) == ia for p in rb.parents)):
        return "contains"
    return None


_WORDS = {"is": "is", "inside": "lies inside", "contains": "contains"}


def check_paths(inputs: Mapping[str, str | os.PathLike | None], outputs: Mapping[str, str | os.PathLike | None],
                *, dirs: Iterable[str] = ()) -> None:
    """One error naming both flags where an output is, contains or sits inside an input or another output.

    inputs/outputs: {label: path} (label e.g. "--model"); None values are left out. dirs: the labels of inputs that
    are directories; another input found to be a directory is its reader's error (not a file), not a container
    here. Run before any work."""
    dirs = set(dirs)
    ins = [(label, p) for label, p in inputs.items() if p not in (None, "", "-")]
    outs = [(label, p) for label, p in outputs.items() if p not in (None, "", "-")]
    for k, (out_label, out) in enumerate(outs):
        for in_label, inp in ins:
            how = relation(out, inp)
            if how == "inside" and in_label not in dirs and os.path.isdir(inp):
                continue  # a file input given a directory: its reader says so
            if how:
                raise PipelineError(
                    f"{out}: the output {out_label} {_WORDS[how]} the input {in_label} {inp}; writing it would "
                    f"destroy what this command reads. Give {out_label} a path of its own"
                )
        for other_label, other in outs[k + 1 :]:
            how = relation(out, other)
            if how:
                raise PipelineError(
                    f"{out}: the output {out_label} {_WORDS[how]} the output {other_label} {other}; one would "
                    f"overwrite the other. Give each output a path of its own"
                )


def _files_below(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir() or p.is_symlink())


def check_owned_dir(path: str | os.PathLike, label: str, stage: str, *, signature: str | None = None,
                    allowed: Iterable[str] = ()) -> None:
    """A directory output the stage replaces as a whole: absent, empty, or holding only what the stage wrote
    (its MANIFEST lists it; `allowed` are glob patterns of what the stage writes there besides, e.g.
    checkpoint-*). A directory written before manifests existed is accepted, with a warning, when it holds
    the stage's `signature` file. Anything else is refused: the stage would delete files it did not write."""
    path = Path(path)
    if not path.is_dir():
        return  # absent (a file where a directory goes is check_output_path's error)
    files = _files_below(path)
    if not files:
        return
    manifest = path / MANIFEST
    listed: set[str] = set()
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            listed = set(data["files"]) if isinstance(data, dict) and isinstance(data.get("files"), list) else set()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            listed = set()
        if not listed:
            raise PipelineError(f"{manifest}: damaged (not the list of files the {stage} stage wrote); {label} {path} "
                                f"is replaced as a whole, so check what it holds, remove it and run again")
    elif signature is not None and (path / signature).is_file():
        log.warning("%s: written before output manifests (no %s); replacing it as the %s stage's own output", path, MANIFEST, stage)
        return
    patterns = list(allowed)
    foreign = [f for f in files if f != MANIFEST and f not in listed
               and not any(fnmatch.fnmatch(f, pat) or fnmatch.fnmatch(f.split("/", 1)[0], pat) for pat in patterns)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PipelineError(
            f"{path}: {label} already holds {len(foreign)} file(s) the {stage} stage did not write ({shown}); it "
            f"replaces {label} as a whole, so they would be lost. Move them, or give another {label}"
        )


def write_manifest(directory: str | os.PathLike, stage: str, extra: Iterable[str] = ()) -> None:
    """Record what the stage wrote into `directory` (every file now below it, plus `extra`), as MANIFEST."""
    directory = Path(directory)
    files = sorted(set(f for f in _files_below(directory) if f != MANIFEST) | set(extra))
    (directory / MANIFEST).write_text(json.dumps({"stage": stage, "files": files}, ensure_ascii=False, indent=1) + "\n",
                                      encoding="utf-8")


def staging_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.tmp")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, stage: str, label: str = "--out", *, signature: str | None = None,
               allowed: Iterable[str] = (), staging: Path | None = None):
    """A directory output built in .<name>.tmp beside it (or `staging`) and put in place whole at the end: the
    MANIFEST of what the stage wrote is added, and it replaces out (checked again with check_owned_dir: never a
    directory holding files the stage did not write). A failure anywhere removes the staging directory and
    leaves out as it was; a full disk is one error naming out."""
    out = Path(out)
    check_owned_dir(out, label, stage, signature=signature, allowed=allowed)
    tmp = Path(staging) if staging is not None else staging_path(out)
    if tmp.exists() and staging is None:
        shutil.rmtree(tmp)  # what a killed run left
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        write_manifest(tmp, stage)
        check_owned_dir(out, label, stage, signature=signature, allowed=allowed)
        replace_dir(tmp, out)
    except PipelineError:
        raise
    except Exception as exc:
        if disk_full(exc):
            raise PipelineError(f"{out}: cannot write this output (No space left on device); "
                                f"{'the previous one is unchanged' if out.exists() else 'nothing was written'}. "
                                f"Free some space (or give another path) and run again") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
