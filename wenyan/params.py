"""params.yaml: reading a stage's sections (through DVC, or a file given) and checking them against the stage's schema.

params.yaml holds the values (one source of truth); a stage holds a schema: for each key its type and, where it
matters, its choices and range (Int, Float, Str, Bool, ListOf, OneOf). Missing, unknown and misspelled keys are errors.
Every number has an upper bound: the schema's own, else UPPER_BOUNDS here (a typo such as 1e9 resamples or new tokens
is an error naming the key, not a run that never ends). GPU-only values on a machine without the GPUs they need
(machine_problems: 4-bit loading, bitsandbytes optimizers, unsloth, num_gpus) are refused before any stage runs.
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
    items: the type of each element of a list (the bounds then hold for each number of it); null: None accepted. NaN
    and infinities are never accepted, nor an int of 2**53 or more in size (no count or seed here is that large).
    check_params adds UPPER_BOUNDS' max where a number has no upper bound of its own."""

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
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
            return f"is out of range ({value}); a count or seed here is well below 2**53"
        if self.items is not None and not all(_is_kind(v, self.items) for v in value):
            return f"should be a list of {self.items.__name__}, got {value!r}"
        for number in (value if self.items is not None else [value]):  # a list of numbers: each item in range
            if _is_kind(number, float):  # (str, int) keys: the bounds are the int's
                problem = self.out_of_range(number)
                if problem:
                    return problem if self.items is None else f"item {problem}"
        return None

    def out_of_range(self, value) -> str | None:
        if self.min is not None and value < self.min:
            return f"must be >= {_show(self.min)}; got {value!r}"
        if self.max is not None and value > self.max:
            return f"must be <= {_show(self.max)}; got {value!r}"
        if self.above is not None and value <= self.above:
            return f"must be > {_show(self.above)}; got {value!r}"
        if self.below is not None and value >= self.below:
            return f"must be < {_show(self.below)}; got {value!r}"
        return None

    def is_number(self) -> bool:
        """A key that holds a number (or a list of numbers), so it needs an upper bound."""
        return not self.choices and (int in self.kinds or float in self.kinds or self.items in (int, float))

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


def setting(param: Param, *, identity: bool = False):
    """A field of a section's config dataclass (wenyan/training/config.py): its Param (type, choices, range) and
    whether it is part of the run's identity (train.resume refuses checkpoints made with another value). No default:
    params.yaml holds every value."""
    return dataclasses.field(metadata={"param": param, "identity": identity})


def schema_of(config: type) -> dict[str, Param]:
    """{key: Param} of a config dataclass, in field order: what check_params checks a section against."""
    return {f.name: f.metadata["param"] for f in dataclasses.fields(config)}


def identity_keys(config: type) -> tuple[str, ...]:
    """The keys of a config dataclass marked identity=True."""
    return tuple(f.name for f in dataclasses.fields(config) if f.metadata.get("identity"))


# Upper bounds of the numeric keys whose schema (in the stage's module) gives none: every number of params.yaml has
# a range, so a typo (`-S evaluate.bootstrap_resamples=1000000000`, a missing decimal point) fails in check_params
# instead of running for days. A schema's own max or below wins. Each bound is far above any value this project
# runs (the shipped params, profiles/*.yaml, reports/runs/*) and says what a larger value would mean.
STEPS = 10**7  # optimizer steps, warmup and logging/eval/save cadences: 10M steps is months of a GPU's time
SEED = 2**32 - 1  # numpy's seed range (transformers.set_seed seeds numpy too); the train and pretrain schemas use it
UPPER_BOUNDS = {
    "clean.min_chars": 100_000,  # characters a side: no sentence of a corpus is a whole book
    "clean.max_chars": 100_000,  # (史记's longest lines are ~500)
    "clean.max_ratio": 1000,  # long side / short side: 1000 keeps every pair; the shipped 4 drops misalignments
    "split.seed": SEED,
    "pretrain.max_seq_length": 131_072,  # tokens a sequence: 128k, the longest context of models this size
    "pretrain.max_tokens": 10**11,  # 100B tokens: 2,000x the monolingual corpus (51M characters)
    "pretrain.max_steps": STEPS,
    "pretrain.epochs": 1000,  # passes over the data
    "pretrain.batch_tokens": 1 << 24,  # 16M tokens a step: the largest LLM pretraining batches (~4-16M)
    "pretrain.gradient_accumulation_steps": 4096,  # micro-batches a step
    "pretrain.warmup_steps": STEPS,
    "pretrain.weight_decay": 10,  # AdamW's decoupled decay: 0.01-0.1 is usual; lr x decay >= 1 zeroes a weight a step
    "pretrain.logging_steps": STEPS,
    "pretrain.extend_vocab": 10**9,  # a minimum count (as train.extend_vocab); the int of auto | none | N
    "train.max_seq_length": 131_072,
    "train.max_train_samples": 10**9,  # 0 = all; 1e9 pairs is 35,000x the 史记 train split
    "train.lora_r": 8192,  # LoRA rank: above a model's hidden size (SmolLM2 576, Gemma 3 270M 640) it adds nothing
    "train.lora_alpha": 65_536,  # the scale is alpha / r: 65536 / 8192 = 8 at the largest rank
    "train.batch_tokens": 1 << 24,  # real tokens a micro-batch (the gpu profile: 65,536)
    "train.batch_size": 65_536,  # rows a micro-batch when batch_tokens is 0 (evaluate's GPU batch: 512)
    "train.gradient_accumulation_steps": 4096,
    "train.warmup_steps": STEPS,
    "train.max_steps": STEPS,
    "train.epochs": 1000,
    "train.weight_decay": 10,
    "train.logging_steps": STEPS,
    "train.eval_steps": STEPS,
    "train.eval_samples": 10**6,  # valid pairs for the eval loss (a CPU forward pass of 32 takes ~15 s)
    "train.save_steps": STEPS,
    "train.save_total_limit": 10_000,  # checkpoints kept, each a copy of the trainable weights and optimizer state
    "train.num_gpus": 64,  # GPUs of one host (torchrun --standalone launches on this machine only; hosts hold <= 16)
    "train.extend_vocab": 10**9,  # a minimum count of a character in the train split
    "evaluate.num_samples": 10**7,  # 0 = all; test sentences scored (the gpu profile: 2,000)
    "evaluate.seed": SEED,
    "evaluate.batch_size": 65_536,  # sentences a generation batch (the gpu profile: 512)
    "evaluate.num_beams": 64,  # beam search keeps num_beams x batch_size sequences in memory
    "evaluate.max_new_tokens_extra": 4096,  # tokens a sentence may run past factor x its length: a reply that never
    #                                         ends its turn runs to it, for each of the test sentences
    "evaluate.bootstrap_resamples": 100_000,  # sacrebleu's paired bootstrap: 1,000 gives the 95% CI; each resample
    #                                           scores the whole test set again
    "evaluate.length_buckets": 100_000,  # each bucket's upper edge, in source characters (clean.max_chars at most)
    "evaluate.num_examples": 100_000,  # sentences in reports/evaluate/samples.md
    "evaluate.num_gpus": 64,
    "export.check_samples": 100_000,  # test sentences translated by transformers and by each GGUF
}


def bounded(param: Param, name: str) -> Param:
    """The Param with UPPER_BOUNDS[name] ("stage.key") as its max where its schema gives no upper bound."""
    if param.is_number() and param.max is None and param.below is None and name in UPPER_BOUNDS:
        return dataclasses.replace(param, max=UPPER_BOUNDS[name])
    return param


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
        problem = bounded(param, f"{stage}.{key}").problem(section[key])
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


# ----------------------------------------------------------------------------------------------
# Values this machine cannot run: checked by check_params (every section, before any stage runs) and by train before
# it touches its outputs, so that `method: qlora` on a laptop is one line at the start, not a failure after the data
# is read and the old checkpoints are cleared.

# transformers' optimizers that are bitsandbytes' (trainer_optimizer._BITSANDBYTES_OPTIMIZERS; galore's 8-bit ones
# use bitsandbytes too): CUDA kernels, so no CPU run. tests/test_bounds.py keeps this list equal to transformers'.
BITSANDBYTES_OPTIMIZERS = (
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "ademamix", "ademamix_8bit",
    "paged_ademamix_32bit", "paged_ademamix_8bit", "lion_8bit", "lion_32bit", "paged_lion_32bit", "paged_lion_8bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw_8bit", "galore_adamw_8bit_layerwise",
)
GPU_SECTIONS = ("pretrain", "train", "evaluate")  # the sections with GPU-only values


def machine_problems(params: dict, gpus: int, *, launched: bool = False) -> list[str]:
    """One line for each value of params ({section: {key: value}}) that a machine with `gpus` visible CUDA GPUs
    cannot run, naming the key and what to set instead. launched: the process runs under torchrun, which gave it
    its processes (num_gpus is not counted against the GPUs then: tests run 2 processes on CPU with gloo).
    Values of the wrong type are left to the schemas."""
    out = []
    for section in GPU_SECTIONS:
        values = params.get(section)
        if not isinstance(values, dict):
            continue
        key = f"{section}."
        if not gpus:
            if values.get("method") == "qlora":
                out.append(f"{key}method qlora loads the base in 4 bits (bitsandbytes), which needs a CUDA GPU and none "
                           f"is visible; set {key}method: lora (or full)")
            elif values.get("load_in_4bit") is True:
                out.append(f"{key}load_in_4bit loads the base in 4 bits (bitsandbytes), which needs a CUDA GPU and none "
                           f"is visible; set {key}load_in_4bit: false")
            if values.get("optim") in BITSANDBYTES_OPTIMIZERS:
                what = "is a bitsandbytes optimizer, which needs" if installed("bitsandbytes") else \
                    "needs a package that is not installed (bitsandbytes) and"
                out.append(f"{key}optim {values['optim']} {what} a CUDA GPU, and none is visible; set {key}optim: auto "
                           f"(adamw_torch on CPU) or adamw_torch")
            if values.get("backend") == "unsloth":
                out.append(f"{key}backend unsloth needs a CUDA GPU and none is visible; set {key}backend: auto "
                           f"(plain transformers on CPU) or hf")
        wanted = values.get("num_gpus")
        if not launched and isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > max(gpus, 1):
            shown = os.environ.get("CUDA_VISIBLE_DEVICES")  # as wenyan.distributed.check_gpus says it
            where = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
            out.append(f"{key}num_gpus is {wanted} but {gpus} CUDA GPU(s) are visible{where}; set {key}num_gpus to at "
                       f"most {max(gpus, 1)}")
    return out


def installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def visible_gpus() -> int:
    """CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES applies); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_machine(params: dict, *, launched: bool = False) -> None:
    """machine_problems on this machine: one PipelineError, the problems joined with '; '."""
    problems = machine_problems(params, visible_gpus(), launched=launched)
    if problems:
        raise PipelineError("; ".join(problems))
