"""params.yaml: reading a stage's sections (through DVC, or a file given) and checking them against the stage's schema.

params.yaml holds the values (one source of truth); a stage holds a schema: for each key its type and, where it
matters, its choices and range (Int, Float, Str, Bool, ListOf, OneOf). Missing, unknown and misspelled keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from wenyan.errors import PipelineError


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


def add_params_options(parser, *, check: bool = True) -> None:
    """The options every stage takes besides its paths: --params (a params.yaml read directly instead of through
    DVC: tests, benchmarks) and --check-params (check the parameters, then exit: what the check_params stage runs)."""
    parser.add_argument("--params", type=Path, default=None, help="read this params.yaml instead of asking DVC (tests, benchmarks)")
    if check:
        parser.add_argument("--check-params", action="store_true", help="only check the parameters, then exit (the check_params stage)")


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


def named_entries(given, section: str) -> list[tuple[str, dict]]:
    """The entries of a list-of-sources parameter (ingest.sources, pretrain.sources) as [(where, entry)]: a
    mapping {name: {path, ...}} (each entry gets its key as "name"; `dvc exp show` then has a flat column per
    field and `-S section.NAME.path=...` reads well) or, as before, a list of {path, ...} ([i] in `where`)."""
    if isinstance(given, dict):
        out = []
        for name, entry in given.items():
            if str(name).isdigit():  # `-S section.0.path=...` from the days of a list: it would add a source
                raise PipelineError(f"params.yaml '{section}.{name}': sources are keyed by name ({section}."
                                    f"{next((str(k) for k in given if not str(k).isdigit()), 'NAME')}.path=...), not by "
                                    f"list index; a number as a source name is refused")
            if not isinstance(entry, dict) or "name" in entry:
                raise PipelineError(f"params.yaml '{section}.{name}' should be a mapping of path, format, ... "
                                    f"(its name is the key)")
            out.append((f"{section}.{name}", {**entry, "name": str(name)}))
    elif isinstance(given, list):
        out = [(f"{section}[{i}]", entry) for i, entry in enumerate(given)]
    else:
        out = []
    if not out:
        raise PipelineError(f"params.yaml '{section}' should be a non-empty mapping of name: {{path, format, ...}} "
                            "(or a list of {path, format, ...})")
    return out


def set_key(params: dict, dotted: str, value: str) -> None:
    """Apply one `-S a.b.0.c=value` override; the value is parsed as YAML (numbers, lists, null). A new key adds a
    mapping entry (`pretrain.sources.more.path=x`: a third source); an index one past the end of a list adds an
    entry to the list."""
    import yaml

    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        if isinstance(node, list):
            if int(key) == len(node):
                node.append({})
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    parsed = yaml.safe_load(value)
    if isinstance(node, list):
        if int(last) == len(node):
            node.append(parsed)
        else:
            node[int(last)] = parsed
    else:
        node[last] = parsed
