"""The one artifact-schema helper (issue #21, class 2): every file a stage reads from another stage (or a
user edited by hand) is checked at the boundary, and a bad one is one `error:` line naming the file, the
row (line) and the field, never a traceback or a silently wrong result later.

A schema is plain data:
    str, int, float, bool, type(None)   that type (int is accepted where float is; bool is never an int)
    (int, None)                         any of these (None = JSON null)
    [item]                              a list whose elements fit item
    {"key": spec, ...}                  a mapping with these keys (Optional(spec): the key may be absent);
                                        keys the schema does not name are allowed (artifacts grow new keys)
    Check(spec, test, "what")           spec, and test(value) must be true ("a non-empty string")
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from wenyan.errors import PipelineError


@dataclasses.dataclass(frozen=True)
class Optional:
    spec: Any


@dataclasses.dataclass(frozen=True)
class Check:
    spec: Any
    test: Callable[[Any], bool]
    what: str


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null",
          list: "a list", dict: "a mapping (JSON object)"}


def _kind_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:40] + '…'}"


def _describe(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, list):
        return "a list"
    if isinstance(spec, dict):
        return "a mapping (JSON object)"
    if isinstance(spec, Check):
        return spec.what
    if spec is None:
        return "null"
    return _NAMES.get(spec, getattr(spec, "__name__", str(spec)))


def _fits_type(value: Any, kind: Any) -> bool:
    if kind is None or kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def problem(value: Any, spec: Any, field: str = "") -> tuple[str, str] | None:
    """(field path, what is wrong) for the first place value does not fit spec, or None."""
    if isinstance(spec, Check):
        found = problem(value, spec.spec, field)
        if found and found[0] != field:  # deeper: a list item's field
            return found
        return None if not found and spec.test(value) else (field, f"should be {spec.what}, got {_kind_name(value)}")
    if isinstance(spec, tuple):
        for option in spec:
            if problem(value, option, field) is None:
                return None
        return field, f"should be {_describe(spec)}, got {_kind_name(value)}"
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return field, f"should be a mapping (JSON object), got {_kind_name(value)}"
        for key, sub in spec.items():
            where = f"{field}.{key}" if field else key
            if key not in value:
                if isinstance(sub, Optional):
                    continue
                return where, "is missing"
            found = problem(value[key], sub.spec if isinstance(sub, Optional) else sub, where)
            if found:
                return found
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return field, f"should be a list, got {_kind_name(value)}"
        for i, item in enumerate(value):
            found = problem(item, spec[0], f"{field}[{i}]")
            if found:
                return found
        return None
    if not _fits_type(value, spec):
        return field, f"should be {_describe(spec)}, got {_kind_name(value)}"
    return None


def check(value: Any, spec: Any, where: str, fix: str = "") -> Any:
    """value if it fits spec, else PipelineError '<where>: field 'x.y' should be ..., got ...; <fix>'."""
    found = problem(value, spec)
    if found:
        field, what = found
        raise PipelineError(f"{where}: " + (f"field '{field}' " if field else "") + what + (f"; {fix}" if fix else ""))
    return value


def read_text(path: str | os.PathLike, fix: str, *, missing_ok: bool = False) -> str | None:
    """An artifact's text (UTF-8, a BOM dropped): missing (None where missing_ok), unreadable or not UTF-8 is one
    error naming the file; fix says how to get a good one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise PipelineError(f"{path}: not found; {fix}") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read it ({exc.strerror}); {fix}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); {fix}") from None


def read_json(path: str | os.PathLike, spec: Any, fix: str) -> Any:
    """A JSON artifact read and checked: missing, unreadable, not UTF-8, not JSON, or not fitting spec is one
    error naming the file (and field); fix says how to get a good one (e.g. 'rerun the train stage')."""
    path = Path(path)
    text = read_text(path, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); {fix}") from None
    return check(value, spec, str(path), fix)


def check_rows(rows: Iterable[dict], spec: Any, path: str | os.PathLike, fix: str, *, unique: str | None = None,
               lines: list[int] | None = None) -> None:
    """Each row of a JSONL artifact fits spec (errors name '<path>:<line>'; row numbers where lines are not
    known); with unique, that field's values are all different (a duplicate names both lines)."""
    seen: dict[Any, int] = {}
    for n, row in enumerate(rows):
        line = lines[n] if lines is not None else n + 1
        where = f"{path}:{line}" if lines is not None else f"{path}: row {line}"
        check(row, spec, where, fix)
        if unique is not None:
            key = row[unique]
            key = (type(key).__name__, key) if not isinstance(key, (dict, list)) else json.dumps(key)
            if key in seen:
                first = f"line {seen[key]}" if lines is not None else f"row {seen[key]}"
                raise PipelineError(f"{where}: field '{unique}' {row[unique]!r} is also the {unique} of {first}; "
                                    f"each row needs its own ({fix})")
            seen[key] = line


# ----------------------------------------------------------------------------------------------
# The schemas of what the stages hand each other


def _nonempty(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


NON_EMPTY = Check(str, _nonempty, "a non-empty string")
MESSAGE = {"role": str, "content": str}
PROMPT_FORMAT = {
    "system_prompt": str,
    "user_template": str,
    "context_sentences": Check(int, lambda v: v >= 0, "an integer >= 0"),
    "context_template": str,
}
TRAINING_CONFIG = {  # models/adapter/training_config.json (train), models/export/**/training_config.json (export)
    "model": NON_EMPTY,
    "max_seq_length": Optional((Check(int, lambda v: v > 0, "an integer > 0"), None)),
    "backend": Optional((str, None)),
    "load_in_4bit": Optional(bool),
    "method": Optional(str),
    "added_tokens": Optional(([int], None)),
    "end_of_turn_token": Optional((str, None)),
    "prompt": {"format": PROMPT_FORMAT, "opencc": (str, None)},
}
ROW_ID = (str, int)
TEST_ROW = {  # data/format/test.jsonl as evaluate and export read it
    "id": ROW_ID,
    "source": str,
    "target": str,
    "messages": Check([MESSAGE], lambda m: len(m) >= 2 and m[-1]["role"] == "assistant" and m[-2]["role"] == "user",
                      "a list of {role, content} messages ending with the user's turn and the assistant's reference"),
    "book": Optional((str, int, None)),
    "chapter": Optional((str, int, None)),
    "line": Optional((int, str, None)),
    "unseen_book": Optional(bool),  # true: a book with no train or valid row, scored apart (stages/format.py)
}
TRAIN_ROW = {  # data/format/{train,valid}.jsonl as train reads them
    "messages": Check([MESSAGE], lambda m: len(m) >= 2 and m[-1]["role"] == "assistant" and m[-2]["role"] == "user",
                      "a list of {role, content} messages ending with the user's turn and the assistant's reply"),
}
BASE_OUTPUT_ROW = {"id": ROW_ID, "output": str, "hit_limit": bool}  # data/evaluate/base_outputs.jsonl
RUN_IDENTITY_FILE = dict  # models/checkpoints/run_identity.json: a mapping of the keys train compares
