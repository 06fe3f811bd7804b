"""params.yaml is the one source of truth: every stage's schema (types, choices, ranges; no values) accepts the
shipped file, and a missing, unknown, misspelled or out-of-range key is an error naming it."""

from __future__ import annotations

import math

import pytest
from conftest import SHIPPED, shipped

from stages import clean, evaluate, export, format, ingest, pretrain, split, train
from wenyan.errors import PipelineError
from wenyan.params import check_params

SCHEMAS = {"ingest": ingest.SCHEMA, "clean": clean.SCHEMA, "split": split.SCHEMA, "format": format.SCHEMA,
           "pretrain": pretrain.SCHEMA, "train": train.SCHEMA, "evaluate": evaluate.SCHEMA, "export": export.SCHEMA}


@pytest.mark.parametrize("stage", sorted(SCHEMAS))
def test_shipped_params_fit_every_stage_schema(stage):
    assert set(SCHEMAS[stage]) == set(SHIPPED[stage])  # no key without a value, no value without a schema
    assert check_params(SHIPPED[stage], SCHEMAS[stage], stage) == SHIPPED[stage]


def test_every_stage_has_a_schema():
    assert set(SHIPPED) == set(SCHEMAS)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "stage, section, message",
    [
        ("train", {k: v for k, v in shipped("train").items() if k != "epochs"}, r"'train:' lacks key\(s\) epochs"),
        ("train", {**shipped("train"), "lerning_rate": 1}, r"'lerning_rate' \(did you mean 'learning_rate'\?\)"),
        ("train", shipped("train", learning_rate=math.nan), "train.learning_rate must be a finite number"),
        ("train", shipped("train", weight_decay=math.inf), "train.weight_decay must be a finite number"),
        ("train", shipped("train", learning_rate=0), r"train.learning_rate must be > 0; got 0"),
        ("train", shipped("train", warmup_steps=-1), r"train.warmup_steps must be >= 0; got -1"),
        ("train", shipped("train", lora_dropout=1.0), r"train.lora_dropout must be < 1"),
        ("train", shipped("train", method="dora"), "train.method must be one of lora, qlora, full; got 'dora'"),
        ("train", shipped("train", padding_free="yes"), "train.padding_free must be one of auto, true, false"),
        ("train", shipped("train", padding_free=1), "train.padding_free must be one of"),  # 1 is not true
        ("train", shipped("train", batch_size=True), "train.batch_size should be int, got bool"),
        ("train", shipped("train", target_modules=["q_proj", 3]), "train.target_modules should be a list of str"),
        ("train", shipped("train", chat_template=3), "train.chat_template should be str"),
        ("split", shipped("split", test_books="论语"), "split.test_books should be a list of str"),
        ("evaluate", shipped("evaluate", max_new_tokens_factor=-1.0), "evaluate.max_new_tokens_factor must be > 0"),
        ("format", shipped("format", context_sentences=-1), "format.context_sentences must be >= 0"),
        ("pretrain", shipped("pretrain", enabled="yes"), "pretrain.enabled should be bool"),
        ("pretrain", shipped("pretrain", max_seq_length=1), "pretrain.max_seq_length must be > 1"),
        ("pretrain", shipped("pretrain", batch_tokens=0), "pretrain.batch_tokens must be > 0"),
        ("pretrain", shipped("pretrain", sources="x"), "pretrain.sources should be dict or list, got str"),
        ("pretrain", {**shipped("pretrain"), "max_token": 5}, r"'max_token' \(did you mean 'max_tokens'\?\)"),
    ],
)
def test_schema_errors_name_the_key(stage, section, message):
    with pytest.raises(PipelineError, match=message):
        check_params(section, SCHEMAS[stage], stage)


def test_null_only_where_the_schema_allows_it():
    assert check_params(shipped("train", chat_template=None), train.SCHEMA, "train")["chat_template"] is None
    with pytest.raises(PipelineError, match="train.model should be str, got null"):
        check_params(shipped("train", model=None), train.SCHEMA, "train")
