"""Issue #21 (reliability, round three): the shared rules and each class of failure in the stages and commands
that read or write that kind of thing.

  1. outputs that would destroy inputs or other outputs (relations.check_paths, output manifests)
  2. damaged or hand-edited artifacts (artifacts: one schema helper)
  3. a full disk (the atomic writers; tests on a real tmpfs as root, on /dev/full links elsewhere)
  4. ingest drops nothing silently
  5. resume never mixes runs (checkpoints.run_identity, last_complete_checkpoint)
  6. late failures found before data or model loading
  7. special tokens in text are text (safetext)
  8. translate as a tool (cache dir, streaming, CR line ends)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stages.common import PipelineError
from wenyan import artifacts, checkpoints, relations

bad_input = pytest.mark.bad_input


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# 1. Path relations


@bad_input
@pytest.mark.parametrize("spelling", ["same", "dotdot", "relative", "symlink", "hard link", "inside", "contains",
                                      "symlinked parent"])
def test_relation_of_every_spelling(tmp_path, spelling, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    src = tmp_path / "d" / "in.txt"
    src.write_text("x")
    expected = "is"
    if spelling == "same":
        out = src
    elif spelling == "dotdot":
        out = tmp_path / "d" / "sub" / ".." / "in.txt"
    elif spelling == "relative":
        monkeypatch.chdir(tmp_path / "d" / "sub")
        out = Path("../in.txt")
    elif spelling == "symlink":
        out = tmp_path / "link.txt"
        out.symlink_to(src)
    elif spelling == "hard link":
        out = tmp_path / "hard.txt"
        os.link(src, out)
    elif spelling == "inside":
        out, src, expected = tmp_path / "d" / "sub" / "new" / "out.txt", tmp_path / "d", "inside"
    elif spelling == "contains":
        out, expected = tmp_path, "contains"
    else:
        (tmp_path / "alias").symlink_to(tmp_path / "d")
        out, src, expected = tmp_path / "alias" / "sub" / "x", tmp_path / "d" / "sub", "inside"
    assert relations.relation(out, src) == expected
    with pytest.raises(PipelineError, match=r"the output --out .* the input --in .*Give --out a path of its own"):
        relations.check_paths({"--in": src}, {"--out": out})


def test_relation_of_siblings_and_prefix_names_is_none(tmp_path):
    (tmp_path / "model").mkdir()
    assert relations.relation(tmp_path / "model-export", tmp_path / "model") is None  # a prefix of the name only
    assert relations.relation(tmp_path / "a.json", tmp_path / "b.json") is None
    relations.check_paths({"--model": tmp_path / "model"}, {"--out": tmp_path / "export", "--report": tmp_path / "r.json"})


@bad_input
def test_two_outputs_on_one_path_are_refused(tmp_path):
    with pytest.raises(PipelineError, match=r"p: the output --out is the output --report .*x/../p; one would overwrite the other"):
        relations.check_paths({}, {"--out": tmp_path / "p", "--report": tmp_path / "x" / ".." / "p"})


@bad_input
def test_owned_dir_with_foreign_files_is_refused_and_kept(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "training_config.json").write_text("{}")
    relations.write_manifest(out, "train")
    relations.check_owned_dir(out, "--out", "train")  # only what the stage wrote: fine
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(PipelineError, match=r"--out already holds 1 file\(s\) the train stage did not write \(notes.txt\)"):
        relations.check_owned_dir(out, "--out", "train")
    assert tree(out) == before


@bad_input
def test_owned_dir_without_manifest(tmp_path, caplog):
    out = tmp_path / "x"
    out.mkdir()
    (out / "unrelated.bin").write_bytes(b"1")
    with pytest.raises(PipelineError, match="did not write"):
        relations.check_owned_dir(out, "--out", "export", signature="hf/training_config.json")
    (out / "hf").mkdir()
    (out / "hf" / "training_config.json").write_text("{}")  # an export written before manifests existed
    relations.check_owned_dir(out, "--out", "export", signature="hf/training_config.json")
    assert "written before output manifests" in caplog.text


def test_owned_dir_allowed_patterns(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoint-5").mkdir(parents=True)
    (ckpt / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    (ckpt / "run_identity.json").write_text("{}")
    relations.write_manifest(ckpt, "train", ["run_identity.json"])
    relations.check_owned_dir(ckpt, "--checkpoints", "train", allowed=["checkpoint-*"])
    (ckpt / "mine.txt").write_text("x")
    with pytest.raises(PipelineError, match=r"mine.txt"):
        relations.check_owned_dir(ckpt, "--checkpoints", "train", allowed=["checkpoint-*"])


# ----------------------------------------------------------------------------------------------
# 2. Artifact schemas


GOOD_CONFIG = {"model": "m", "max_seq_length": 512, "prompt": {"format": {
    "system_prompt": "s", "user_template": "翻译：{classical}", "context_sentences": 0, "context_template": "{context}"},
    "opencc": "t2s"}}


@bad_input
@pytest.mark.parametrize("change, message", [
    ({"max_seq_length": "512"}, r"field 'max_seq_length' should be an integer > 0 or null, got str '512'"),
    ({"prompt": {**GOOD_CONFIG["prompt"], "format": {**GOOD_CONFIG["prompt"]["format"], "context_sentences": "2"}}},
     r"field 'prompt.format.context_sentences' should be an integer >= 0, got str '2'"),
    ({"prompt": ["t2s"]}, r"field 'prompt' should be a mapping \(JSON object\), got a list"),
    ({"model": ""}, r"field 'model' should be a non-empty string, got str ''"),
    ({"prompt": {"opencc": "t2s"}}, r"field 'prompt.format' is missing"),
])
def test_training_config_schema_names_the_field(tmp_path, change, message):
    path = tmp_path / "training_config.json"
    path.write_text(json.dumps({**GOOD_CONFIG, **change}), encoding="utf-8")
    with pytest.raises(PipelineError, match=f"^{path}: {message}; retrain"):
        artifacts.read_json(path, artifacts.TRAINING_CONFIG, "retrain")
    path.write_text(json.dumps(GOOD_CONFIG), encoding="utf-8")
    assert artifacts.read_json(path, artifacts.TRAINING_CONFIG, "retrain") == GOOD_CONFIG


@bad_input
@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "should be a mapping \\(JSON object\\), got a list"),
    (b'{"model": "\xff"}', "not UTF-8"),
    (b'{"model": ', "not valid JSON"),
])
def test_json_artifact_not_a_mapping_or_not_utf8(tmp_path, content, message):
    path = tmp_path / "training_config.json"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=f"^{path}(:1)?: {message}"):
        artifacts.read_json(path, artifacts.TRAINING_CONFIG, "retrain")


ROW = {"id": "c/书/篇#1", "source": "学而", "target": "学习", "messages": [
    {"role": "system", "content": "s"}, {"role": "user", "content": "学而"}, {"role": "assistant", "content": "学习"}]}


@bad_input
@pytest.mark.parametrize("row, message", [
    ({**ROW, "target": None}, "field 'target' should be a string, got null"),
    ({**ROW, "messages": ["学而", "学习"]}, r"field 'messages\[0\]' should be a mapping"),
    ({k: v for k, v in ROW.items() if k != "id"}, "field 'id' is missing"),
    ({**ROW, "messages": ROW["messages"][:2]}, "field 'messages' should be a list of {role, content} messages ending"),
])
def test_test_rows_schema_names_line_and_field(tmp_path, row, message):
    with pytest.raises(PipelineError, match=f"^t.jsonl:2: {message}"):
        artifacts.check_rows([ROW, row], artifacts.TEST_ROW, "t.jsonl", "rerun format", lines=[1, 2])


@bad_input
def test_duplicate_ids_name_both_lines():
    with pytest.raises(PipelineError, match=r"^t.jsonl:3: field 'id' 'c/书/篇#1' is also the id of line 1"):
        artifacts.check_rows([ROW, {**ROW, "id": "other"}, ROW], artifacts.TEST_ROW, "t.jsonl", "fix", unique="id",
                             lines=[1, 2, 3])


# ----------------------------------------------------------------------------------------------
# 5. Resume: identity and whole checkpoints


def fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint-<step> as the Trainer writes one (real torch and safetensors files, tiny)."""
    import torch
    from safetensors.torch import save_file

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, path / "adapter_model.safetensors")
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    torch.save({"python": 1}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@bad_input
@pytest.mark.parametrize("damage", ["optimizer truncated", "no trainer_state (killed mid-save)", "weights truncated",
                                    "scheduler missing", "state of another step"])
def test_incomplete_checkpoint_is_skipped_for_the_last_complete_one(tmp_path, damage):
    good = fake_checkpoint(tmp_path, 2)
    bad = fake_checkpoint(tmp_path, 4)
    if damage == "optimizer truncated":
        data = (bad / "optimizer.pt").read_bytes()
        (bad / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage.startswith("no trainer_state"):
        (bad / "trainer_state.json").unlink()
    elif damage == "weights truncated":
        data = (bad / "adapter_model.safetensors").read_bytes()
        (bad / "adapter_model.safetensors").write_bytes(data[:-3])
    elif damage == "scheduler missing":
        (bad / "scheduler.pt").unlink()
    else:
        (bad / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    found, skipped = checkpoints.last_complete_checkpoint(tmp_path)
    assert found == good and [p for p, _ in skipped] == [bad]
    assert checkpoints.last_complete_checkpoint(tmp_path / "none") == (None, [])


def test_run_identity_covers_data_model_and_schedule(tmp_path):
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("a\n")
    valid.write_text("b\n")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    cfg = {"learning_rate": 1e-4, "lr_scheduler": "cosine", "optim": "auto", "seed": 1, "target_modules": ("q",)}
    one = checkpoints.run_identity(cfg, train, valid, str(model))
    assert checkpoints.identity_difference(one, checkpoints.run_identity(cfg, train, valid, str(model))) == []
    train.write_text("c\n")
    two = checkpoints.run_identity({**cfg, "learning_rate": 2e-4}, train, valid, str(model))
    assert checkpoints.identity_difference(one, two) == ["learning_rate", "train_data_sha256"]


# ----------------------------------------------------------------------------------------------
# 3. A full disk


@bad_input
def test_atomic_outputs_on_a_full_disk_one_line_previous_kept(full_disk):
    from stages.common import atomic_outputs, write_json

    data, report = full_disk.directory / "pairs.bin", full_disk.directory / "report.json"
    with atomic_outputs(data, report) as (d, r):
        d.write_bytes(b"old data")
        write_json(r, {"old": True})
    before = full_disk.files()
    full_disk.fill()
    with pytest.raises(PipelineError, match=rf"^{data}: cannot write this output \(No space left on device\); the previous "
                                            rf"one is unchanged\. Free some space"):
        with atomic_outputs(data, report) as (d, r):
            d.write_bytes(b"new data " * 10_000)
            write_json(r, {"new": True})
    assert full_disk.files() == before and full_disk.leftovers() == []


@bad_input
def test_write_json_on_a_full_disk_names_the_output_not_its_temporary(full_disk):
    from stages.common import write_json

    path = full_disk.directory / "new" / "metrics.json"
    full_disk.fill()
    with pytest.raises(PipelineError, match=rf"^{path}: cannot write this output \(No space left on device\); nothing was written"):
        write_json(path, {"x": "y" * 100_000})
    assert not path.exists() and full_disk.leftovers() == []
