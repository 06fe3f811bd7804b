"""Output files and the row files between stages: output-path checks, atomic outputs, JSON/JSONL/pairs IO.

Outputs are written to a temporary file in the same directory, then renamed, so a stage killed half-way never
leaves a partial file that DVC or the user could take for a good one. A directory output grows in its
staging directory (staging_path, made empty by new_staging_dir: the one staging helper) and replaces the old
whole (replace_dir); staged_dir does all of it for a stage's directory output, with its manifest, the
foreign-files check (check_owned_dir) and a full disk as one error.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from wenyan.errors import PipelineError, get_logger

log = get_logger("files")


TEMP_SUFFIX = ".partial.tmp"  # .<output name>.<pid>-<random>.partial.tmp; .gitignore keeps these out of git


def sha256_file(path: str | os.PathLike) -> str:
    """The file's SHA-256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def user_cache_dir() -> Path:
    """The user's cache directory for what the commands derive (dequantised models, llama.cpp's converter):
    $WENYAN_MT_CACHE, else $XDG_CACHE_HOME/wenyan-mt, else ~/.cache/wenyan-mt."""
    base = os.environ.get("WENYAN_MT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wenyan-mt"
    return Path(base)


def shown_path(path: str | os.PathLike, limit: int = 160) -> str:
    """A path for an error line: as it is, or (a name thousands of characters long) its start and end."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return text if len(text) <= limit else f"{text[:100]}…{text[-50:]} ({len(text):,} characters)"


def path_error(exc: OSError, what: str = "") -> PipelineError:
    """The one line for an OSError on a user-given path: the path (shortened), what failed, and why."""
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    why = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENAMETOOLONG:
        why += "; the path or one of its names is longer than the system allows, give a shorter one"
    where = " -> ".join(shown_path(n) for n in names) or "a path"
    return PipelineError(f"{where}: {what} ({why})" if what else f"{where}: {why}")


def with_path_errors(main):
    """main(argv) with an OSError that names a path (a name too long, a link loop, no permission, a path that
    vanished meanwhile) turned into one error line naming it, for run_main to print: no traceback, for every
    path a user can give a command. An OSError naming no path is a bug, and keeps its traceback."""
    import functools

    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except OSError as exc:
            if exc.filename is None:
                raise
            raise path_error(exc) from None

    return wrapped


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
                if disk_full(exc):
                    raise PipelineError(write_failure(target, exc)) from None
                check_output_path(target)  # says why, if it can
                raise PipelineError(f"{target}: cannot write this output ({exc.strerror})") from None
        try:
            yield temps
        except PipelineError:
            raise
        except Exception as exc:  # a full disk while writing: one line naming the output, not a traceback
            target = _failed_target(exc, temps, targets)
            if target is None:
                raise
            raise PipelineError(write_failure(target, exc)) from None
        for target in targets:  # before any rename: a rename would replace /dev/null with a file
            if target.exists() and not target.is_file():
                raise PipelineError(f"{target}: is {file_kind(target.stat().st_mode)}, but this output is a file; give a file name")
        for tmp, target in zip(temps, targets):  # renames only: the outputs change together, at the very end
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise PipelineError(write_failure(target, exc)) from None
    finally:
        for tmp in temps:
            if tmp.exists() or tmp.is_symlink():
                with contextlib.suppress(OSError):
                    tmp.unlink()


DISK_FULL_ERRNOS = {28, 122, 27}  # ENOSPC, EDQUOT, EFBIG
DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "File too large")


def disk_full(exc: BaseException) -> bool:
    """Whether exc says the disk (or quota) is full: an OSError with that errno, or a library's own error
    carrying the message (pyarrow, safetensors and torch write through their own C++/Rust code)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(exc) for text in DISK_FULL_TEXT)


def write_failure(target: Path, exc: BaseException) -> str:
    """The one line for an output that could not be written; whatever was there before is unchanged."""
    if target.name.startswith(".") and target.name.endswith(TEMP_SUFFIX):  # a writer's temporary file: its output
        target = target.with_name(target.name[1 : -len(TEMP_SUFFIX)].rsplit(".", 1)[0])
    if disk_full(exc):
        why = "No space left on device" if "quota" not in str(exc).lower() else "Disk quota exceeded"
    else:
        why = getattr(exc, "strerror", None) or str(exc)
    before = "the previous one is unchanged" if target.exists() else "nothing was written"
    return f"{target}: cannot write this output ({why}); {before}. Free some space (or give another path) and run again"


def _failed_target(exc: BaseException, temps: list[Path], targets: list[Path]) -> Path | None:
    """The output a write error inside an atomic_outputs block belongs to: the one whose temporary file it names,
    or, for a full disk, the first output (a disk-full error often names no file); None: not a write error."""
    name = getattr(exc, "filename", None)
    for tmp, target in zip(temps, targets):
        if name is not None and os.fspath(name) in (os.fspath(tmp), os.path.abspath(tmp)):
            return target
    if disk_full(exc):
        text = str(exc)
        return next((target for tmp, target in zip(temps, targets) if str(tmp) in text or tmp.name in text), targets[0])
    return None


def staging_path(out: str | os.PathLike) -> Path:
    """Where an output that is built in place grows until it is renamed onto `out` (os.replace, replace_dir): the
    hidden `.<name>.tmp` beside it, so a run that fails or is killed leaves the last good output as it was."""
    out = Path(out)
    return out.with_name(f".{out.name}.tmp")


def new_staging_dir(out: str | os.PathLike) -> Path:
    """An empty directory of its own beside out (.<name>.<pid>-<random>.tmp, made by mkdtemp: never a fixed name, so
    two runs to one output never build in, or delete, each other's). What a killed run left is removed first
    (its pid is not alive), as is staging_path(out), the fixed name of earlier versions."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = staging_path(out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        pid = stale.name[len(out.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700: the output directory gets what mkdir would give it
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished tmp directory at out; the old out is removed only once the new one is in place. The old one
    is moved into a directory of its own first, so a concurrent run replacing out too never loses (or mixes)
    either: the last rename wins, and out is always one run's whole output."""
    for _ in range(20):
        holder = None
        if out.is_symlink() or out.exists():
            holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".old", dir=out.parent))
            try:
                os.replace(out, holder / out.name)
            except FileNotFoundError:  # another run moved it away first
                pass
        try:
            os.replace(tmp, out)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            continue  # another run put its output there meanwhile: move that one aside and try again
        finally:
            if holder is not None:
                shutil.rmtree(holder, ignore_errors=True)
        return
    raise PipelineError(f"{out}: other runs keep replacing this output; run one at a time")


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


def read_jsonl(path: str | os.PathLike, *, with_lines: bool = False):
    """Read a JSONL file; a bad line is an error naming the file and line. with_lines: (rows, their line numbers),
    for schema errors that name the line (wenyan.artifacts.check_rows)."""
    rows, lines = [], []
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
            lines.append(lineno)
    return (rows, lines) if with_lines else rows


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


# ----------------------------------------------------------------------------------------------
# Paths given to one command, checked against each other before any work (issue #21, class 1).
#
# No output may be an input, contain one or sit inside one, nor be, contain or sit inside another output, under
# any spelling: relative or absolute, `..`, a symlink anywhere on the way (compared as realpaths), a hard link or
# a bind mount (compared by (st_dev, st_ino) of the file and of every directory above it). A directory output
# that a stage replaces as a whole (train's --out, --reports and --checkpoints, base's and export's --out) is
# built staged (staged_dir) and carries a manifest of what the stage wrote (MANIFEST); a directory already there
# that holds anything else is refused, never emptied.

KEPT = ".gitignore"  # DVC writes one beside cached outputs (reports/train/summary.json): not foreign, kept
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
    if path.is_symlink():  # replaced whole, a link would become a directory and its target stay stale (or be lost)
        raise PipelineError(f"{path}: {label} is a symbolic link (to {os.readlink(path)}); the {stage} stage replaces "
                            f"its output directory as a whole, so give {label} the real directory's path")
    if not path.is_dir():
        return  # absent (a file where a directory goes is check_output_path's error)
    files = _files_below(path)
    if not files:
        return
    manifest = path / MANIFEST
    listed: set[str] = set()
    if manifest.is_file():
        data = None
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            listed = set(data["files"]) if isinstance(data, dict) and isinstance(data.get("files"), list) else set()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            listed = set()
        owner = data.get("stage") if isinstance(data, dict) else None
        if isinstance(owner, str) and owner != stage:
            raise PipelineError(f"{path}: {label} is the {owner} stage's output ({MANIFEST} says so); the {stage} "
                                f"stage would replace it as a whole. Give {label} a path of its own")
        if not listed:
            raise PipelineError(f"{manifest}: damaged (not the list of files the {stage} stage wrote); {label} {path} "
                                f"is replaced as a whole, so check what it holds, remove it and run again")
    elif signature is not None and (path / signature).is_file():
        log.warning("%s: written before output manifests (no %s); replacing it as the %s stage's own output", path, MANIFEST, stage)
        return
    patterns = [*allowed, KEPT]
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


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, stage: str, label: str = "--out", *, signature: str | None = None,
               allowed: Iterable[str] = (), staging: Path | None = None):
    """A directory output built in .<name>.tmp beside it (or `staging`) and put in place whole at the end: the
    MANIFEST of what the stage wrote is added, and it replaces out (checked again with check_owned_dir: never a
    directory holding files the stage did not write). A failure anywhere removes the staging directory and
    leaves out as it was; a full disk is one error naming out."""
    out = Path(out)
    check_owned_dir(out, label, stage, signature=signature, allowed=allowed)
    if staging is None:
        tmp = new_staging_dir(out)  # the one staging helper: what a killed run left is removed
    else:
        tmp = Path(staging)
        tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        write_manifest(tmp, stage)
        check_owned_dir(out, label, stage, signature=signature, allowed=allowed)
        kept = out / KEPT
        if kept.is_file() and not (tmp / KEPT).exists():
            shutil.copy2(kept, tmp / KEPT)  # DVC's .gitignore for the cached outputs inside: carried over, not lost
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
