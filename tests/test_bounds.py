"""Values checked early, with bounds (issue 29, class 3): every number of params.yaml has an upper bound (a typo such
as 1e9 bootstrap resamples is an error naming the key), a prompt template takes its one placeholder plain (no
`{classical:>100000000}`, `{classical.__class__}`), and values this machine cannot run (qlora, 4-bit, a bitsandbytes
optimizer or unsloth without CUDA; more GPUs than it has) are refused by check_params before any stage runs, and by
train before it touches its outputs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BASE_PARAMS, SHIPPED, shipped

from stages import check_params as check_stage
from stages import clean, evaluate, export, format, ingest, pretrain, split, train
from wenyan import params as params_module
from wenyan.errors import PipelineError
from wenyan.params import UPPER_BOUNDS, bounded, check_params, machine_problems
from wenyan.prompt import check_templates

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = {"ingest": ingest.SCHEMA, "clean": clean.SCHEMA, "split": split.SCHEMA, "format": format.SCHEMA,
           "pretrain": pretrain.SCHEMA, "train": train.SCHEMA, "evaluate": evaluate.SCHEMA, "export": export.SCHEMA}
NUMBERS = [(stage, key) for stage, schema in SCHEMAS.items() for key, param in schema.items() if param.is_number()]


def upper(stage: str, key: str):
    param = bounded(SCHEMAS[stage][key], f"{stage}.{key}")
    return param.max if param.max is not None else param.below


# ----------------------------------------------------------------------------------------------
# Every number has an upper bound


def test_every_numeric_key_has_an_upper_bound_and_no_bound_names_a_key_that_is_gone():
    assert [f"{s}.{k}" for s, k in NUMBERS if upper(s, k) is None] == []
    numeric = {f"{s}.{k}" for s, k in NUMBERS}
    assert sorted(set(UPPER_BOUNDS) - numeric) == []  # a stale entry would bound nothing
    own = {f"{s}.{k}" for s, k in NUMBERS if SCHEMAS[s][k].max is not None or SCHEMAS[s][k].below is not None}
    assert sorted(own & set(UPPER_BOUNDS)) == []  # a schema's own bound wins: a second one here would only mislead


def profile_values() -> list[tuple[str, str, object]]:
    """(stage, key, value) of every number set by profiles/*.yaml and reports/runs/*/params.yaml (what was run)."""
    out = []
    for path in sorted(REPO.glob("profiles/*.yaml")):
        for dotted, value in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).items():
            stage, _, key = dotted.partition(".")
            if (stage, key) in NUMBERS:
                out.append((stage, key, value))
    for path in sorted(REPO.glob("reports/runs/*/params.yaml")):
        for stage, section in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).items():
            for key, value in (section or {}).items() if isinstance(section, dict) else ():
                if (stage, key) in NUMBERS:
                    out.append((stage, key, value))
    return out


def test_the_bounds_pass_every_value_shipped_or_run():
    for stage, key in NUMBERS:
        assert SCHEMAS[stage][key].problem(SHIPPED[stage][key]) is None
    for stage, key, value in profile_values():
        problem = bounded(SCHEMAS[stage][key], f"{stage}.{key}").problem(value)
        assert problem is None, (stage, key, value, problem)


def past_bound(stage: str, key: str):
    """A value just past the key's upper bound (a list: its last item)."""
    param, bound = SCHEMAS[stage][key], upper(stage, key)
    return [10, 20, int(bound) + 1] if param.items else (int(bound) + 1 if int in param.kinds else bound * 2 + 1)


def bound_kind(stage: str, key: str) -> tuple:
    param = bounded(SCHEMAS[stage][key], f"{stage}.{key}")
    return (param.kinds, param.items, param.max is not None)  # an inclusive (<=) or an exclusive (<) upper bound


# One numeric key of each kind of bound goes through the parametrized test; the loop below holds every key to it.
BOUND_KINDS = list({bound_kind(s, k): (s, k) for s, k in reversed(NUMBERS)}.values())


@pytest.mark.bad_input
@pytest.mark.parametrize("stage, key", BOUND_KINDS, ids=[f"{s}.{k}" for s, k in BOUND_KINDS])
def test_a_number_past_its_bound_is_an_error_naming_the_key(stage, key):
    with pytest.raises(PipelineError, match=rf"^params.yaml: {stage}\.{key} (item )?must be <=? "):
        check_params(shipped(stage, **{key: past_bound(stage, key)}), SCHEMAS[stage], stage)


@pytest.mark.bad_input
def test_every_number_past_its_bound_is_an_error_naming_the_key():
    passed = []
    for stage, key in NUMBERS:
        try:
            check_params(shipped(stage, **{key: past_bound(stage, key)}), SCHEMAS[stage], stage)
            passed.append(f"{stage}.{key}: accepted")
        except PipelineError as err:
            if not re.match(rf"^params.yaml: {stage}\.{key} (item )?must be <=? ", str(err)):
                passed.append(f"{stage}.{key}: {err}")
    assert not passed, passed
    assert len(BOUND_KINDS) < len(NUMBERS) / 4


@pytest.mark.bad_input
@pytest.mark.parametrize("key", ["bootstrap_resamples", "max_new_tokens_extra", "num_beams", "num_samples"])
def test_a_billion_is_refused_where_it_used_to_pass(key):
    with pytest.raises(PipelineError, match=rf"evaluate\.{key} must be <= \d+; got 1000000000"):
        evaluate.check_evaluate_params(shipped("evaluate", **{key: 10**9}))


def test_a_str_or_int_key_bounds_only_its_int():
    param = bounded(train.SCHEMA["extend_vocab"], "train.extend_vocab")
    assert param.problem("auto") is None and param.problem(5) is None
    assert "must be <= 1000000000" in param.problem(10**10)


# ----------------------------------------------------------------------------------------------
# Templates: one placeholder, plain


@pytest.mark.bad_input
@pytest.mark.parametrize("template", [
    "{classical:>100000000}",  # a 100 MB prompt a sentence
    "翻译：{classical:>9}", "{classical.__class__}", "{classical.__class__.__mro__}", "{classical[0]}", "{classical!r}",
    "{classical!s}", "{classical:{classical}}", "{classical}{0}", "{context}{classical}", "{classical}{other}",
])
def test_a_template_placeholder_that_is_not_plain_is_refused(template):
    fmt = shipped("format", user_template=template)
    with pytest.raises(PipelineError, match=r"^params.yaml 'format.user_template' .* does not format with only "
                                            r"\{classical\}: \{.*\} is not allowed \(its one placeholder is "
                                            r"\{classical\}, plain"):
        check_templates(check_params(fmt, format.SCHEMA, "format"))


@pytest.mark.bad_input
@pytest.mark.parametrize("template", ["{}", "{0}", "{ classical }", "{text}", "翻译"])
def test_a_template_without_its_placeholder_is_refused(template):
    with pytest.raises(PipelineError, match=r"^params.yaml 'format.user_template' should contain \{classical\}"):
        check_templates(shipped("format", user_template=template))


@pytest.mark.bad_input
@pytest.mark.parametrize("template", ["上文：{context!r}\n", "上文：{context:>99999999}\n", "{context[0]}", "{classical}"])
def test_the_context_template_is_held_to_the_same_rule(template):
    fmt = shipped("format", context_sentences=2, context_template=template)
    with pytest.raises(PipelineError, match=r"'format.context_template'"):
        check_templates(fmt)
    check_templates({**fmt, "context_sentences": 0})  # not used: not checked


@pytest.mark.parametrize("template", ["{classical}", "翻译：\n{classical}", "{classical}\n——{classical}",
                                      "{{注}}：{classical}", "JSON: {{\"text\": \"{classical}\"}}"])
def test_plain_placeholders_and_literal_braces_pass(template):
    check_templates(shipped("format", user_template=template))


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({**BASE_PARAMS, **sections}, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def pipeline_of(tmp_path: Path, *stages: str) -> Path:
    """A dvc.yaml with only these stages of the shipped one (check_params then runs only their checks)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump({"stages": {s: spec["stages"][s] for s in stages}}), encoding="utf-8")
    return path


@pytest.mark.bad_input
def test_check_params_refuses_a_bad_template_in_one_error_line(tmp_path):
    params = write_params(tmp_path / "params.yaml", format=shipped("format", user_template="{classical.__class__}"))
    proc = subprocess.run([sys.executable, "-m", "stages.check_params", "--out", str(tmp_path / "checked.json"),
                           "--pipeline", str(pipeline_of(tmp_path, "format")), "--params", str(params)],
                          cwd=REPO, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: stage format: params.yaml 'format.user_template' '{classical.__class__}' does "
                                "not format with only {classical}: {classical.__class__} is not allowed")
    assert not (tmp_path / "checked.json").exists()


# ----------------------------------------------------------------------------------------------
# What this machine cannot run


def gpu_values(**train_values) -> dict:
    return {"train": shipped("train", **train_values), "pretrain": shipped("pretrain"), "evaluate": shipped("evaluate")}


@pytest.mark.bad_input
@pytest.mark.parametrize("section, values, message", [
    ("train", {"method": "qlora"}, "train.method qlora loads the base in 4 bits (bitsandbytes), which needs a CUDA GPU "
                                   "and none is visible; set train.method: lora (or full)"),
    ("train", {"load_in_4bit": True}, "train.load_in_4bit loads the base in 4 bits (bitsandbytes), which needs a CUDA "
                                      "GPU and none is visible; set train.load_in_4bit: false"),
    ("train", {"optim": "adamw_8bit"}, "train.optim adamw_8bit is a bitsandbytes optimizer, which needs a CUDA GPU, and "
                                       "none is visible; set train.optim: auto (adamw_torch on CPU) or adamw_torch"),
    ("train", {"optim": "paged_adamw_32bit"}, "train.optim paged_adamw_32bit is a bitsandbytes optimizer"),
    ("pretrain", {"optim": "lion_8bit"}, "pretrain.optim lion_8bit is a bitsandbytes optimizer"),
    ("train", {"backend": "unsloth"}, "train.backend unsloth needs a CUDA GPU and none is visible; set train.backend: auto"),
    ("pretrain", {"backend": "unsloth"}, "pretrain.backend unsloth needs a CUDA GPU"),
    ("train", {"num_gpus": 2}, "train.num_gpus is 2 but 0 CUDA GPU(s) are visible; set train.num_gpus to at most 1"),
    ("evaluate", {"num_gpus": 4}, "evaluate.num_gpus is 4 but 0 CUDA GPU(s) are visible; set evaluate.num_gpus to at most 1"),
])
def test_gpu_only_values_without_cuda_are_one_line_naming_the_key(monkeypatch, section, values, message):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(params_module, "installed", lambda package: True)  # bitsandbytes installed, no CUDA
    params = gpu_values()
    params[section] = {**params[section], **values}
    problems = machine_problems(params, gpus=0)
    assert len(problems) == 1 and problems[0].startswith(message) and "\n" not in problems[0]


def test_a_bitsandbytes_optimizer_not_installed_says_so(monkeypatch):
    monkeypatch.setattr(params_module, "installed", lambda package: False)
    assert machine_problems(gpu_values(optim="adamw_bnb_8bit"), gpus=0) == [
        "train.optim adamw_bnb_8bit needs a package that is not installed (bitsandbytes) and a CUDA GPU, and none is "
        "visible; set train.optim: auto (adamw_torch on CPU) or adamw_torch"]


def test_what_a_machine_has_it_may_use(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert machine_problems(gpu_values(), gpus=0) == []  # the shipped params run on CPU
    gpu_only = gpu_values(method="qlora", optim="adamw_8bit", backend="unsloth", num_gpus=2)
    assert machine_problems(gpu_only, gpus=2) == []
    assert machine_problems(gpu_only, gpus=1) == ["train.num_gpus is 2 but 1 CUDA GPU(s) are visible; set "
                                                  "train.num_gpus to at most 1"]
    # under torchrun the processes are given (tests run 2 gloo processes on CPU): num_gpus is not counted
    assert machine_problems(gpu_values(num_gpus=2), gpus=0, launched=True) == []
    # a value of the wrong type is the schema's to report, not a crash here
    assert machine_problems({"train": {"num_gpus": "two", "optim": ["x"]}, "evaluate": None}, gpus=0) == []


def test_the_bitsandbytes_optimizers_are_transformers_own():
    optimizer = pytest.importorskip("transformers.trainer_optimizer")
    names = getattr(optimizer, "_BITSANDBYTES_OPTIMIZERS", None)
    if names is None:
        pytest.skip("this transformers keeps no list of its bitsandbytes optimizers")
    assert set(params_module.BITSANDBYTES_OPTIMIZERS) == {n.value for n in names} | {"galore_adamw_8bit",
                                                                                    "galore_adamw_8bit_layerwise"}


@pytest.mark.bad_input
def test_check_params_refuses_gpu_only_values_before_running_any_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(params_module, "visible_gpus", lambda: 0)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a stage's checks first"))
    params = write_params(tmp_path / "params.yaml", train=shipped("train", method="qlora", optim="adamw_bnb_8bit"),
                          evaluate=shipped("evaluate", num_gpus=2))
    with pytest.raises(PipelineError) as err:
        check_stage.main(["--out", str(tmp_path / "checked.json"), "--params", str(params),
                          "--pipeline", str(REPO / "dvc.yaml")])
    assert str(err.value).split("; set ")[0] == ("train.method qlora loads the base in 4 bits (bitsandbytes), which "
                                                 "needs a CUDA GPU and none is visible")
    assert "train.optim adamw_bnb_8bit" in str(err.value)
    assert "evaluate.num_gpus is 2 but 0 CUDA GPU(s) are visible" in str(err.value)
    assert not (tmp_path / "checked.json").exists()


# ----------------------------------------------------------------------------------------------
# train: nothing of the last run deleted before the params, the data and the model are checked


def last_run_checkpoints(base: Path) -> Path:
    """What a good run left in --checkpoints: the identity marker and a checkpoint."""
    from wenyan.training.checkpoints import CHECKPOINTS_SIGNATURE

    checkpoints = base / "checkpoints"
    (checkpoints / "checkpoint-2").mkdir(parents=True)
    (checkpoints / "checkpoint-2" / "model.safetensors").write_bytes(b"weights of the last run")
    (checkpoints / CHECKPOINTS_SIGNATURE).write_text("{}", encoding="utf-8")
    return checkpoints


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, gpus, message", [
    ({"method": "qlora"}, 0, "train.method qlora loads the base in 4 bits"),
    ({"optim": "adamw_8bit"}, 0, "train.optim adamw_8bit (is a bitsandbytes optimizer|needs a package)"),
    ({"num_gpus": 2}, 1, r"train.num_gpus is 2 but 1 CUDA GPU\(s\) are visible"),
])
def test_train_refuses_what_the_machine_cannot_run_before_reading_or_deleting(tiny_train, tmp_path, monkeypatch,
                                                                              overrides, gpus, message):
    from train_run import run_train as run

    monkeypatch.setattr(params_module, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(train, "read_rows", lambda *a, **k: pytest.fail("read the data first"))
    monkeypatch.setattr(train, "pick_backend", lambda *a, **k: pytest.fail("chose a backend first"))
    checkpoints = last_run_checkpoints(tmp_path / "run")
    with pytest.raises(PipelineError, match=message):
        run(tiny_train, tmp_path, **overrides)
    assert (checkpoints / "checkpoint-2" / "model.safetensors").read_bytes() == b"weights of the last run"


@pytest.mark.bad_input
def test_train_keeps_the_last_checkpoints_when_the_data_fails_its_checks(tiny_train, tmp_path):
    """Every example longer than max_seq_length: an error once the rows are tokenised, after the model loaded; a
    fresh run used to clear --checkpoints before that."""
    from train_run import run_train as run

    checkpoints = last_run_checkpoints(tmp_path / "run")
    with pytest.raises(PipelineError, match="every example was dropped by truncation; raise train.max_seq_length"):
        run(tiny_train, tmp_path, max_seq_length=4)
    assert (checkpoints / "checkpoint-2" / "model.safetensors").read_bytes() == b"weights of the last run"
