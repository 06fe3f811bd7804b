"""Every params key x bad values (NaN, infinities, negatives, zero where it must be positive, wrong types, a
bool for an int, huge integers, a string where YAML should give a number): each is a clear error naming the
key, raised by the stage's own parameter checks (what its main() runs before reading data or loading a
model): one parametrized case per kind of key and bad value, one loop over every key. The params file itself: a key given twice, `1e-4` read as a number as DVC reads it."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from conftest import BASE_PARAMS, SHIPPED, shipped

from stages import clean, evaluate, export, format, ingest, split, train
from wenyan import models
from wenyan.errors import PipelineError
from wenyan.params import check_params, load_sections, Param
from wenyan.prompt import check_templates

pytestmark = pytest.mark.bad_input

SCHEMAS = {"ingest": ingest.SCHEMA, "clean": clean.SCHEMA, "split": split.SCHEMA, "format": format.SCHEMA,
           "train": train.SCHEMA, "evaluate": evaluate.SCHEMA, "export": export.SCHEMA}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A directory resolve_model accepts (config.json): train's checks run without the built-in model installed."""
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(path)


def stage_checks(stage: str, section: dict, model_dir: str) -> None:
    """All the checks of a stage's params that its main() runs before any data or model."""
    if stage == "train":
        train.resolve_config({**section, "model": section["model"] if section["model"] != SHIPPED["train"]["model"] else model_dir})
    elif stage == "evaluate":
        evaluate.check_evaluate_params(section)
    elif stage == "export":
        export.check_export_params(section)
    elif stage == "clean":
        clean.check_clean_params(check_params(section, clean.SCHEMA, "clean"))
    elif stage == "split":
        split.check_split_params(check_params(section, split.SCHEMA, "split"))
    elif stage == "format":
        check_templates(check_params(section, format.SCHEMA, "format"))
    elif stage == "ingest":  # sources: a mapping by name or a list, checked entry by entry
        ingest.check_sources(check_params(section, ingest.SCHEMA, "ingest"))
    else:
        check_params(section, SCHEMAS[stage], stage)


def is_number(param: Param) -> bool:
    return not param.choices and (int in param.kinds or float in param.kinds)


def bad_values(param: Param) -> list:
    """Values no key of this kind takes: a mapping; null where null is not allowed; for numbers NaN, infinities, a
    string, a bool and integers beyond any count; a float for an int; a string or a list of null for a list."""
    values = [{"a": 1}]
    if not param.null:
        values.append(None)
    if is_number(param):
        values += [math.nan, math.inf, -math.inf, "2", True, False, 2**64, -2**64, 10**100]
    if param.kinds == (int,):
        values.append(1.5)
    if list in param.kinds:  # a string where a list goes (but a template is a string or its lines)
        values += ([] if str in param.kinds else ["q_proj"]) + [[None]]
    return values


def kind(param: Param) -> tuple:
    """What decides which bad values a key refuses and how: its types, list items, null, choices or not."""
    return (param.kinds, param.items, param.null, bool(param.choices))


KEYS = [(stage, key) for stage, schema in SCHEMAS.items() for key in schema]
# One key of each Param kind (the first in stage order) takes every bad value of its kind through the stage's checks;
# test_every_key_refuses_the_bad_values_of_its_kind holds every other key of the kind to the same values.
KINDS: dict[tuple, tuple[str, str]] = {}
for _stage, _key in KEYS:
    KINDS.setdefault(kind(SCHEMAS[_stage][_key]), (_stage, _key))
GENERIC = [(stage, key, v) for stage, key in KINDS.values() for v in bad_values(SCHEMAS[stage][key])]


@pytest.mark.parametrize("stage, key, value", GENERIC, ids=[f"{s}.{k}={v!r}" for s, k, v in GENERIC])
def test_each_kind_of_key_refuses_values_of_no_use(stage, key, value, model_dir):
    with pytest.raises(PipelineError, match=rf"{stage}\.{key}\b"):
        stage_checks(stage, shipped(stage, **{key: value}), model_dir)


def test_every_key_refuses_the_bad_values_of_its_kind(model_dir):
    """Every key of every stage, every bad value of its kind: check_params (the schema check every stage's checks
    start with) refuses it naming the key. The few values the schema lets through (ingest.sources is a mapping by
    name or a list, checked entry by entry; train.extend_vocab's strings are words) are refused by the stage's own
    checks; those run for them only, so the whole matrix takes a moment."""
    wrong, by_stage = [], []
    for stage, key in KEYS:
        for value in bad_values(SCHEMAS[stage][key]):
            section = shipped(stage, **{key: value})
            try:
                check_params(section, SCHEMAS[stage], stage)
                by_stage.append((f"{stage}.{key}", repr(value)))
                stage_checks(stage, section, model_dir)
            except PipelineError as err:
                if not re.search(rf"{stage}\.{key}\b", str(err)):
                    wrong.append((f"{stage}.{key}", value, str(err)))
            else:
                wrong.append((f"{stage}.{key}", value, "accepted"))
    assert not wrong, wrong
    assert by_stage == [("ingest.sources", "{'a': 1}"), ("ingest.sources", "[None]"), ("train.extend_vocab", "'2'")]
    assert len(KINDS) < len(KEYS) / 4  # a handful of kinds for the stages' keys: what the parametrized test runs


@pytest.mark.parametrize("stage", SCHEMAS)
def test_every_key_is_checked_by_its_stage(stage, model_dir):
    """Each key of the stage, one value no key takes (a mapping), through all the checks its main() runs: no key
    is left out of the stage's checks (a stage that checked a copy without it would pass it through)."""
    for key in SCHEMAS[stage]:
        with pytest.raises(PipelineError, match=rf"{stage}\.{key}\b"):
            stage_checks(stage, shipped(stage, **{key: {"a": 1}}), model_dir)


# Out of range, key by key: what each value would do if it went through (in the comment).
RANGES = [
    ("train", "lora_alpha", 0),  # LoRA's scale alpha/r = 0: trains nothing, exits 0
    ("train", "lora_alpha", -16),
    ("train", "lora_r", 0),
    ("train", "lora_dropout", -0.1),
    ("train", "lora_dropout", 1.0),
    ("train", "learning_rate", 0),
    ("train", "learning_rate", -1e-4),
    ("train", "learning_rate", 2.0),  # diverges at once (no LLM fine-tune uses > 1)
    ("train", "weight_decay", -0.01),
    ("train", "max_seq_length", 0),
    ("train", "max_train_samples", -1),
    ("train", "batch_tokens", -1),
    ("train", "batch_size", 0),
    ("train", "gradient_accumulation_steps", 0),
    ("train", "warmup_steps", -1),
    ("train", "max_steps", -1),
    ("train", "epochs", -1),
    ("train", "logging_steps", 0),
    ("train", "eval_steps", -1),
    ("train", "eval_samples", -1),
    ("train", "save_steps", -1),
    ("train", "save_total_limit", -1),
    ("train", "num_gpus", 0),
    ("train", "seed", -1),  # numpy's seed (transformers.set_seed) takes 0 .. 2**32 - 1
    ("train", "seed", 2**32),
    ("train", "target_modules", []),  # LoRA on nothing
    ("train", "target_modules", ["q_proj", ""]),
    ("train", "dtype", "float16"),
    ("train", "backend", "vllm"),
    ("train", "gradient_checkpointing", "yes"),
    ("evaluate", "num_samples", -1),
    ("evaluate", "batch_size", 0),
    ("evaluate", "num_beams", 0),
    ("evaluate", "max_new_tokens_factor", 0),
    ("evaluate", "max_new_tokens_factor", 1e6),  # a sentence that never ends its turn would run for hours
    ("evaluate", "max_new_tokens_extra", -1),
    ("evaluate", "bootstrap_resamples", 1),
    ("evaluate", "bootstrap_resamples", -1),
    ("evaluate", "length_buckets", []),
    ("evaluate", "length_buckets", [0, 10]),
    ("evaluate", "length_buckets", [20, 10]),
    ("evaluate", "length_buckets", [10, 10]),
    ("evaluate", "length_buckets", [10, 20.5]),
    ("evaluate", "num_examples", -1),
    ("evaluate", "baselines", ["bleu"]),
    ("evaluate", "baselines", ["copy", "copy"]),
    ("clean", "min_chars", -1),
    ("clean", "max_chars", 0),
    ("clean", "max_ratio", 0.5),
    ("split", "valid_fraction", -0.1),
    ("split", "valid_fraction", 1),
    ("split", "test_fraction", 0.99),  # with valid_fraction 0.02: no chapter left for train
    ("format", "context_sentences", -1),
    ("format", "user_template", "翻译"),
    ("export", "dtype", "fp32"),
    ("export", "gguf_quantize", "Q4 K M"),
    ("ingest", "on_misaligned", "warn"),
]


@pytest.mark.parametrize("stage, key, value", RANGES, ids=[f"{s}.{k}={v!r}" for s, k, v in RANGES])
def test_out_of_range_values_are_errors_naming_the_key(stage, key, value, model_dir):
    with pytest.raises(PipelineError, match=rf"{stage}\.{key}\b"):
        stage_checks(stage, shipped(stage, **{key: value}), model_dir)


def test_the_shipped_values_pass_the_same_checks(model_dir):
    for stage in SCHEMAS:
        stage_checks(stage, shipped(stage), model_dir)


# ----------------------------------------------------------------------------------------------
# The params file itself


def write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_key_given_twice_is_an_error_naming_its_lines(tmp_path):
    text = yaml.safe_dump(BASE_PARAMS, allow_unicode=True, sort_keys=False)
    text = text.replace("  max_ratio: 4.0\n", "  max_ratio: 4.0\n  min_chars: 5\n")
    path = write(tmp_path, text)
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("min_chars"))
    second = next(i for i, line in enumerate(lines, 1) if line.strip() == "min_chars: 5")
    with pytest.raises(PipelineError, match=rf"^{path}:{second}: the key 'min_chars' is given twice .*first on line {first}"):
        load_sections("clean", ["clean"], path)
    path = write(tmp_path, text.replace("  min_chars: 5\n", "") + "clean:\n  dedupe: false\n")  # a whole section twice
    with pytest.raises(PipelineError, match="the key 'clean' is given twice"):
        load_sections("clean", ["clean"], path)


def test_numbers_read_as_dvc_reads_them_and_quoted_numbers_are_strings(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1e-4\n  weight_decay: 5E-2\n  epochs: \"2\"\n")
    section = load_sections("train", ["train"], path)["train"]
    assert section["learning_rate"] == 1e-4 and section["weight_decay"] == 0.05  # YAML 1.1 would give '1e-4'
    with pytest.raises(PipelineError, match="train.epochs should be float, got str '2'"):
        check_params(shipped("train", epochs=section["epochs"]), train.SCHEMA, "train")


# ----------------------------------------------------------------------------------------------
# train.target_modules against the model's own modules: from its config alone, before any data or weights


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny import byte_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tokenizer = byte_tokenizer()
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_argv(tmp_path, model, **overrides):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": shipped("train", model=str(model), backend="hf", **overrides),
                                      "format": BASE_PARAMS["format"], "clean": BASE_PARAMS["clean"]}, allow_unicode=True),
                      encoding="utf-8")
    return ["--train", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "adapter"), "--checkpoints",
            str(tmp_path / "ckpt"), "--reports", str(tmp_path / "reports"), "--params", str(params)]


@pytest.mark.parametrize("modules, unknown", [
    (["q_proj", "attn_out"], "'attn_out'"),
    (["query_key_value"], "'query_key_value'"),  # another architecture's name
    (["layers"], "'layers'"),  # a module, but not a layer LoRA wraps
    (["q_proj", "Q_PROJ"], "'Q_PROJ'"),
])
def test_target_modules_that_match_no_layer_fail_before_data_and_weights(tmp_path, tiny_model, monkeypatch, modules, unknown):

    def never(*args, **kwargs):
        raise AssertionError("read data or loaded a model before checking train.target_modules")

    monkeypatch.setattr(train, "read_rows", never)
    monkeypatch.setattr(models, "load_model", never)
    with pytest.raises(PipelineError) as err:
        train.main(train_argv(tmp_path, tiny_model, target_modules=modules))
    message = str(err.value)
    assert message.startswith(f"train.target_modules: {unknown} match(es) no layer of {tiny_model}")
    assert "its linear modules are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message


def test_target_modules_match_as_peft_matches(tiny_model):
    modules = models.model_modules(str(tiny_model))
    for names in (["q_proj", "v_proj"], ["self_attn.q_proj"], ["model.layers.0.mlp.down_proj"], ["embed_tokens"]):
        models.check_target_modules({"method": "lora", "model": "m", "target_modules": names}, modules)
    models.check_target_modules({"method": "full", "model": "m", "target_modules": ["nothing"]}, modules)  # unused


def test_cli_lora_alpha_zero_one_error_line_nothing_written(tmp_path, tiny_model):
    from conftest import run_cli

    error = run_cli("train", *train_argv(tmp_path, tiny_model, lora_alpha=0))
    assert error == "error: params.yaml: train.lora_alpha must be > 0; got 0"
    assert not [p.name for p in tmp_path.iterdir() if p.name != "params.yaml"]
