"""The train: and pretrain: sections of params.yaml, typed: one dataclass each, a field a key.

Each field carries its Param (type, choices, range: wenyan/params.py) and, for train, whether it is part of the run's
identity (train.resume refuses checkpoints made with another value of it). The stages' schemas (stages/train.py
SCHEMA, stages/pretrain.py SCHEMA) and the resume identity (wenyan/training/checkpoints.py IDENTITY_PARAMS) are
derived from these fields, so a new key is declared once. Values live in params.yaml only: no field has a default.

    cfg = TrainConfig.from_section(params["train"])   # check_params against the fields, then typed
    cfg.as_dict()                                     # the plain dict the stage runs on and records
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from wenyan.params import SEED, Bool, Float, Int, ListOf, OneOf, Param, Str, check_params, schema_of, setting

METHODS = ("lora", "qlora", "full")
BACKENDS = ("auto", "unsloth", "hf")
DTYPES = ("auto", "bf16", "fp16", "fp32")
LORA_BIASES = ("none", "all", "lora_only")


class Section:
    """from_section / as_dict for the config dataclasses below (a mixin, not a hierarchy: two plain methods)."""

    SECTION: ClassVar[str]

    @classmethod
    def from_section(cls, section: dict):
        """The section checked against the fields' Params (unknown, missing, wrongly typed keys: one error)."""
        return cls(**check_params(section, schema_of(cls), cls.SECTION))

    def as_dict(self) -> dict:
        """{key: value} in field order (a shallow copy: lists stay the section's own)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class TrainConfig(Section):
    """params.yaml train: (values and their comments there). identity=True: changes what a run computes; the
    others (logging, eval and save cadence, resume itself, num_gpus since the batch is global) do not."""

    SECTION: ClassVar[str] = "train"

    model: str = setting(Str(), identity=True)  # built-in name, hub id, directory or .gguf: models.resolve_model
    backend: str = setting(Str(*BACKENDS), identity=True)
    chat_template: str | None = setting(Str(null=True), identity=True)  # null or a name in CHAT_TEMPLATES
    max_seq_length: int = setting(Int(above=0), identity=True)
    max_train_samples: int = setting(Int(min=0), identity=True)
    load_in_4bit: bool = setting(Bool(), identity=True)
    dtype: str = setting(Str(*DTYPES), identity=True)
    method: str = setting(Str(*METHODS), identity=True)
    lora_r: int = setting(Int(above=0), identity=True)
    lora_alpha: float = setting(Float(above=0), identity=True)
    lora_dropout: float = setting(Float(min=0, below=1), identity=True)
    target_modules: list = setting(ListOf(str), identity=True)  # not empty; names of the model's modules: check_target_modules
    lora_bias: str = setting(Str(*LORA_BIASES), identity=True)
    use_rslora: bool = setting(Bool(), identity=True)
    gradient_checkpointing: object = setting(OneOf("auto", "unsloth", True, False), identity=True)
    padding_free: object = setting(OneOf("auto", True, False), identity=True)
    batch_tokens: int = setting(Int(min=0), identity=True)
    batch_size: int = setting(Int(above=0), identity=True)
    gradient_accumulation_steps: int = setting(Int(above=0), identity=True)
    warmup_steps: int = setting(Int(min=0), identity=True)
    max_steps: int = setting(Int(min=0), identity=True)
    epochs: float = setting(Float(min=0), identity=True)  # > 0 when max_steps is 0
    learning_rate: float = setting(Float(above=0, max=1), identity=True)
    lr_scheduler: str = setting(Str(), identity=True)  # a transformers SchedulerType: trainer.check_trainer_names
    weight_decay: float = setting(Float(min=0), identity=True)
    optim: str = setting(Str(), identity=True)  # auto or a transformers OptimizerNames: trainer.check_trainer_names
    seed: int = setting(Int(min=0, max=SEED), identity=True)  # numpy's range (transformers.set_seed seeds numpy too)
    logging_steps: int = setting(Int(above=0))
    eval_steps: int = setting(Int(min=0))
    eval_samples: int = setting(Int(min=0))
    save_steps: int = setting(Int(min=0))
    save_total_limit: int = setting(Int(min=0))
    resume: bool = setting(Bool())
    num_gpus: int = setting(Int(above=0))
    fsdp: bool = setting(Bool(), identity=True)  # shard the model over the num_gpus processes: trainer.check_fsdp
    extend_vocab: object = setting(Param((str, int)), identity=True)  # auto | none | a minimum count: vocab.parse_setting
    trim_vocab: str = setting(Str("auto", "none", "always"), identity=True)  # wenyan/trim.py: auto trims a vocabulary over 100k


@dataclasses.dataclass
class PretrainConfig(Section):
    """params.yaml pretrain: (values and their comments there)."""

    SECTION: ClassVar[str] = "pretrain"

    enabled: bool = setting(Bool())
    sources: object = setting(Param((dict, list)))  # {name: {path, ...}} (or a list); entries: monolingual.SOURCE_DEFAULTS
    include_train_split: bool = setting(Bool())
    max_seq_length: int = setting(Int(above=1))
    max_tokens: int = setting(Int(min=0))  # 0 = every packed sequence
    max_steps: int = setting(Int(min=0))  # > 0 wins over epochs
    epochs: float = setting(Float(min=0))  # max_steps 0 and epochs 0 = zero tokens = pass-through
    batch_tokens: int = setting(Int(above=0))  # tokens an optimizer step; a multiple of max_seq_length x accumulation
    gradient_accumulation_steps: int = setting(Int(above=0))
    learning_rate: float = setting(Float(above=0, max=1))
    warmup_steps: int = setting(Int(min=0))
    lr_scheduler: str = setting(Str())  # a transformers SchedulerType: trainer.check_trainer_names
    weight_decay: float = setting(Float(min=0))
    optim: str = setting(Str())  # auto (adamw_torch_fused on GPU, adamw_torch on CPU) or a transformers OptimizerNames
    seed: int = setting(Int(min=0, max=SEED))
    logging_steps: int = setting(Int(above=0))
    backend: str = setting(Str(*BACKENDS))
    dtype: str = setting(Str(*DTYPES))
    gradient_checkpointing: object = setting(OneOf("auto", "unsloth", True, False))
    extend_vocab: object = setting(Param((str, int)))  # auto | none | a minimum count: vocab.parse_setting
