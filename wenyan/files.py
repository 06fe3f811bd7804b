"""Output files and the row files between stages: output-path checks, atomic outputs, JSON/JSONL/pairs IO.

Outputs are written to a temporary file in the same directory, then renamed, so a stage killed half-way never
leaves a partial file that DVC or the user could take for a good one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from wenyan.errors import PipelineError


TEMP_SUFFIX = ".partial.tmp"  # .<output name>.<pid>-<random>.partial.tmp; .gitignore keeps these out of git


def nearest_existing(directory: Path) -> Path:
    """directory, or its nearest ancestor that exists: missing directories are made when an output is written."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


def check_output_path(path: str | os.PathLike, *, directory: bool = False) -> None:
    """An output a stage writes at its end, checked at its start (before minutes or hours of work): not a directory
    where a file goes (nor a file where a directory goes), not below a regular file, and in a place where this
    process can create files (a probe file, so that root on a read-only filesystem or under /proc fails too)."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise PipelineError(f"{path}: is a file, but this output is a directory; remove or move the file, or give another path")
    if not directory and path.exists() and not path.is_file():  # a rename would replace /dev/null with a file
        raise PipelineError(f"{path}: is {file_kind(path.stat().st_mode)}, but this output is a file; give a file name")
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise PipelineError(f"{path}: {parent} is a file, not a directory; give an output path in a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", suffix=TEMP_SUFFIX, dir=parent)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot write in {parent} ({exc.strerror}); give another output path") from None
    os.close(fd)
    os.unlink(probe)


def _temp_beside(path: Path) -> Path:
    """An empty temporary file in path's directory (so the final rename stays on one filesystem).

    Temporaries of the same output left by a killed run (kill -9: no `finally` ran) are removed first,
    unless the process named in them is still alive (a concurrent writer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        middle = stale.name[len(path.name) + 2 : -len(".tmp")]
        pid = middle.split("-", 1)[0]
        if stale.name.endswith(TEMP_SUFFIX) and not (pid.isdigit() and _alive(int(pid))):
            stale.unlink(missing_ok=True)
        elif re.fullmatch(r"[a-z0-9_]{8}", middle) and stale.is_file():  # an earlier version's mkstemp name
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:  # mkstemp makes 0600: give the file the existing output's permissions, or those open() would
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~umask
    except OSError:
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    return Path(tmp)


def _alive(pid: int) -> bool:
    """Whether process pid runs now (this process's own pid in a name is a stale one's, reused)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    with atomic_outputs(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield one temporary path per output; rename them all onto their outputs only if the whole block succeeds.

    A stage writes all its outputs (data and report) inside one block, after computing them, so a failure
    anywhere (even between writing the data and writing the report) leaves every last good output as it
    was and no temporary file behind:

        with atomic_outputs(args.out, args.report) as (out, report):
            df.to_parquet(out)
            write_json(report, summary)
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            try:
                temps.append(_temp_beside(target))
            except OSError as exc:  # below a regular file, a read-only place: the stage's check_output_path says so earlier
                check_output_path(target)  # says why, if it can
                raise PipelineError(f"{target}: cannot write this output ({exc.strerror})") from None
        yield temps
        for target in targets:  # before any rename: a rename would replace /dev/null with a file
            if target.exists() and not target.is_file():
                raise PipelineError(f"{target}: is {file_kind(target.stat().st_mode)}, but this output is a file; give a file name")
        for tmp, target in zip(temps, targets):  # renames only: the outputs change together, at the very end
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished tmp directory at out; the old out is removed only once the new one is in place."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a bad line is an error naming the file and line."""
    rows = []
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a directory cannot be read, a FIFO would wait for a writer, a device never end
            raise PipelineError(f"{path}: not a regular file ({file_kind(mode)}); give the JSONL file")
        f = open(path, "rb")
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found; check the path, or run the stage that writes it (dvc repro)") from None
    except OSError as exc:  # a path through a regular file, a link loop, no permission
        raise PipelineError(f"{path}: cannot open the file ({exc.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is harmless
            except UnicodeDecodeError as exc:
                raise PipelineError(
                    f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start} of the line); convert the file to UTF-8 (e.g. iconv -f GBK -t UTF-8)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or delete that line, or rewrite the file "
                    "with the stage that writes it (dvc repro)"
                ) from None
            if not isinstance(row, dict):
                raise PipelineError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}; fix or delete that line, "
                    "or rewrite the file with the stage that writes it (dvc repro)"
                )
            rows.append(row)
    return rows


def file_kind(mode: int) -> str:
    """'a directory', 'a named pipe', ... for an os.stat mode that is not a regular file's."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


# The row schema between the data stages (parquet): provenance first, then the pair.
PAIR_COLUMNS = ("id", "corpus", "book", "chapter", "line", "source", "target")


def read_pairs(path: str | os.PathLike, made_by: str):
    """Read a pairs parquet written by stage `made_by`; a missing file or column is a clear error."""
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run the {made_by} stage first (dvc repro {made_by})") from None
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: a truncated or foreign file
        raise PipelineError(
            f"{path}: not a readable parquet file ({exc}); rebuild it with dvc repro {made_by}"
        ) from None
    missing = [c for c in PAIR_COLUMNS if c not in df.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(PAIR_COLUMNS)}")
    return df
