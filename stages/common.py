"""Helpers that two or more stages share: parameters, atomic output files, JSON/JSONL, logging.

Nothing here knows about a particular stage. Paths come from dvc.yaml as command-line arguments;
parameters come from the stage's own section of params.yaml.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


class PipelineError(Exception):
    """A problem the user can fix (bad input file, bad parameter). Printed without a traceback."""


def get_logger(name: str) -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    return logging.getLogger(name)


# ----------------------------------------------------------------------------------------------
# Parameters


def read_yaml_file(path: Path, what: str):
    """A YAML file's content, numbers such as 1e-4 read as DVC reads them and a key given twice an error; every
    failure one line naming the file (what: "parameters file", "profile")."""
    import yaml

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=unique_key_loader())
    except DuplicateKey as exc:
        raise PipelineError(f"{path}:{exc}") from None
    except FileNotFoundError:
        raise PipelineError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {exc}") from None


def load_params(stage: str, params_file: str | os.PathLike | None = None, *, dvc_stage: str | None = None) -> dict:
    """Return the `stage:` section of params.yaml (load_sections for a stage that reads several)."""
    return load_sections(dvc_stage or stage, [stage], params_file)[stage]


def load_sections(dvc_stage: str, sections: list[str], params_file: str | os.PathLike | None = None) -> dict:
    """Return {section: params} for the sections (or `section.key`s) a stage reads.

    Inside a DVC run this goes through `dvc.api.params_show(stages=dvc_stage)`, which returns only what
    the stage declares in dvc.yaml, so a parameter the stage reads but does not declare fails loudly.
    With an explicit `params_file` (tests, benchmarks) the YAML file is read directly.
    """
    if params_file is None:
        import dvc.api

        try:
            params = dvc.api.params_show(stages=dvc_stage)
        except Exception as exc:  # dvc raises many types; the message is what matters
            raise PipelineError(f"could not read the parameters of stage '{dvc_stage}': {exc}") from exc
    else:
        import yaml

        path = Path(params_file)
        if path.exists() and not path.is_file():  # a directory; a FIFO would block
            raise PipelineError(f"{path}: not a regular file; --params takes a params.yaml file")
        params = read_yaml_file(path, "parameters file")
        if params is None:
            raise PipelineError(f"{path}: empty; expected one section a stage (ingest:, clean:, ...)")
        if not isinstance(params, dict):
            raise PipelineError(
                f"{path}: the top level should be a mapping of stage sections (ingest:, clean:, ...), "
                f"got {type(params).__name__} {str(params)[:40]!r}"
            )
    out = {}
    for name in sections:
        section, _, key = name.partition(".")
        if section not in params or (key and key not in (params[section] or {})):
            what = f"'{section}:' section" if not key else f"'{name}'"
            raise PipelineError(f"params.yaml has no {what} (stage {dvc_stage} reads it)")
        if key:
            out.setdefault(section, {})[key] = params[section][key]
        else:
            out[section] = params[section]
    return out


class DuplicateKey(Exception):
    """A mapping of params.yaml names a key twice (yaml.safe_load would silently keep the last)."""


def unique_key_loader():
    """A yaml.SafeLoader that refuses a key given twice in one mapping (DVC's ruamel.yaml refuses it too)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """Also reads 1e-4 as a number, as YAML 1.2 and DVC do (PyYAML's YAML 1.1 reads it as a string)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKey(
                        f"{key_node.start_mark.line + 1}: the key '{key}' is given twice in one mapping (first on line "
                        f"{first.line + 1}); YAML would silently keep the last one: keep one"
                    )
            return super().construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
    )
    return UniqueKeyLoader


# What a key may hold. params.yaml holds the values (one source of truth); a stage holds a schema: for each
# key its type and, where it matters, its choices and range. Missing, unknown and misspelled keys are errors.


@dataclasses.dataclass(frozen=True)
class Param:
    """The type(s) a params.yaml key may hold, with optional choices, bounds and list item type.

    kinds: Python types accepted (int is accepted where float is; bool is never an int here);
    choices: the allowed values (any kind); min/max: inclusive bounds; above/below: exclusive bounds;
    items: the type of each element of a list; null: None accepted. NaN and infinities are never accepted, nor
    an int of 2**53 or more in size where no max is given (no count or seed here is that large)."""

    kinds: tuple
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    items: type | None = None
    null: bool = False

    def problem(self, value: Any) -> str | None:
        """Why value does not fit, or None."""
        if value is None:
            return None if self.null else f"should be {self.describe()}, got null"
        if self.choices:  # exactly one of these values (True is not 1)
            if any(value == c and type(value) is type(c) for c in self.choices):
                return None
            return f"must be one of {', '.join(map(_show, self.choices))}; got {value!r}"
        if not any(_is_kind(value, kind) for kind in self.kinds):
            return f"should be {self.describe()}, got {type(value).__name__} {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53 and self.max is None:
            return f"is out of range ({value}); a count or seed here is well below 2**53"
        if self.min is not None and value < self.min:
            return f"must be >= {_show(self.min)}; got {value!r}"
        if self.max is not None and value > self.max:
            return f"must be <= {_show(self.max)}; got {value!r}"
        if self.above is not None and value <= self.above:
            return f"must be > {_show(self.above)}; got {value!r}"
        if self.below is not None and value >= self.below:
            return f"must be < {_show(self.below)}; got {value!r}"
        if self.items is not None and not all(_is_kind(v, self.items) for v in value):
            return f"should be a list of {self.items.__name__}, got {value!r}"
        return None

    def describe(self) -> str:
        return " or ".join(("a list of " + self.items.__name__) if k is list and self.items else k.__name__ for k in self.kinds)


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def Int(min=None, max=None, above=None, below=None) -> Param:
    return Param((int,), min=min, max=max, above=above, below=below)


def Float(min=None, max=None, above=None, below=None) -> Param:
    """A finite number (NaN and infinities are errors); an int is accepted."""
    return Param((float,), min=min, max=max, above=above, below=below)


def Str(*choices: str, null: bool = False) -> Param:
    return Param((str,), choices=choices, null=null)


def Bool() -> Param:
    return Param((bool,))


def ListOf(kind: type) -> Param:
    return Param((list,), items=kind)


def OneOf(*choices, null: bool = False) -> Param:
    """Exactly one of these values (e.g. auto, true, false)."""
    return Param((), choices=choices, null=null)



def check_params(section: dict, schema: dict[str, Param], stage: str) -> dict:
    """Validate a params section against the stage's schema: every key present, none unknown, each value fits.

    Returns a copy of the section. A misspelled key is reported with the closest known key."""
    if not isinstance(section, dict):
        raise PipelineError(f"params.yaml '{stage}:' must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, schema, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise PipelineError(
            f"params.yaml '{stage}:' has unknown key(s) {', '.join(hints)}; known keys: {', '.join(sorted(schema))}"
        )
    missing = [key for key in schema if key not in section]
    if missing:
        raise PipelineError(
            f"params.yaml '{stage}:' lacks key(s) {', '.join(missing)}; params.yaml holds every value (see the shipped one)"
        )
    for key, param in schema.items():
        problem = param.problem(section[key])
        if problem:
            raise PipelineError(f"params.yaml: {stage}.{key} {problem}")
    return dict(section)


def check_entry(entry: dict, defaults: dict, where: str) -> dict:
    """A list entry whose keys are optional by design (ingest.sources[i]): unknown keys and wrong types are
    errors (null passes: the stage checks it); missing keys take the defaults given."""
    if not isinstance(entry, dict):
        raise PipelineError(f"params.yaml '{where}:' must be a mapping, got {type(entry).__name__}")
    schema = {key: Param((type(value),), null=True) for key, value in defaults.items()}
    return check_params({**defaults, **entry}, schema, where)


# ----------------------------------------------------------------------------------------------
# Output files: written to a temporary file in the same directory, then renamed, so a stage killed
# half-way never leaves a partial file that DVC or the user could take for a good one.


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


def run_main(main, argv=None) -> None:
    """Run a stage's main(); a PipelineError prints as one clear line and exits 1, no traceback."""
    try:
        main(argv)
    except PipelineError as exc:
        print_error(f"error: {exc}")
        raise SystemExit(1) from None


def print_error(message: str) -> None:
    """One line on stderr whatever it holds: a lone surrogate (a file name or argument that was not UTF-8) or a
    character the terminal's encoding lacks is written as a backslash escape, never a UnicodeEncodeError."""
    stream = sys.stderr
    encoding = getattr(stream, "encoding", None) or "utf-8"
    safe = message.encode(encoding, errors="backslashreplace").decode(encoding, errors="replace")
    try:
        stream.write(safe + "\n")
        stream.flush()
    except UnicodeError:  # a stream that still refuses it: plain ASCII
        stream.write(message.encode("ascii", errors="backslashreplace").decode("ascii") + "\n")
        stream.flush()
