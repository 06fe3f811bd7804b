"""The whole pipeline as a user runs it: `dvc repro` in a fresh git + DVC repo holding this project's
stages/, dvc.yaml and params.yaml, on a small slice of the built-in 史记 corpus and a tiny model built
here (tests/project.py; reproduced once a session: conftest's `reproduced`); then, on copies of it,
`dvc exp run -S ...` and `dvc exp show` see the change, and pretrain switched on runs before train.
"""

from __future__ import annotations

import csv
import json

import pytest
from project import DVC, SHIJI, run, update_params

pytestmark = pytest.mark.slow


def test_dvc_repro_end_to_end(reproduced):
    repo, proc = reproduced["repo"], reproduced["repro"]
    for stage in ("ingest", "clean", "split", "format", "base", "pretrain", "train", "evaluate_base", "evaluate"):
        assert f"Running stage '{stage}'" in proc.stdout
    assert sorted(p.name for p in (repo / "models/pretrain").iterdir()) == [".wenyan-outputs.json", "pretrain.json"]  # disabled: a marker (+ its manifest)

    metrics = json.loads((repo / "reports/metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_sentences"] == 6
    scores = {row["system"]: row for row in csv.DictReader(open(repo / "reports/evaluate/scores.csv", encoding="utf-8"))}
    assert "tok:zh" in scores["model"]["bleu_signature"]  # signatures in scores.csv, metrics.json numbers only
    assert {"copy", "base"} <= set(metrics["baselines"])
    assert (repo / "reports/evaluate/by_book.csv").is_file()
    assert (repo / "reports/evaluate/samples.md").is_file()
    summary = json.loads((repo / "reports/train/summary.json").read_text(encoding="utf-8"))
    assert summary["backend"] == "hf" and summary["steps"] == 3
    assert (repo / "models/adapter/training_config.json").is_file()


def test_pretrain_then_train_and_evaluate_and_a_train_experiment_keeps_it(reproduced, project_copy):
    """A second `dvc repro` changes nothing; then base -> pretrain (a few kB of other 史记 chapters, the train split too) -> train -> evaluate under dvc repro
    (in a copy of the reproduced project: base is up to date, pretrain starts from it);
    `dvc exp run -S train.learning_rate=...` re-runs train and evaluate, never pretrain, and shows in `dvc exp show`;
    back to the first learning rate, DVC's run cache restores train's and evaluate's outputs byte for byte."""
    mono = "\n\n".join(c.read_text(encoding="utf-8") for c in sorted(SHIJI.rglob("source.txt"))[12:15]
                        ).replace("\n\n\n", "\n\n")[:6000]
    repo, env, dvc = project_copy, reproduced["env"], DVC
    # A second repro (in a copy, at another path) changes nothing
    assert run(["git", "status", "--porcelain"], repo, env).stdout == ""  # the fixture committed everything
    assert "Running stage" not in run(dvc + ["repro"], repo, env).stdout

    update_params(repo, pretrain=dict(
        enabled=True, sources=[{"path": "data/mono/shiji.txt", "format": "text"}], include_train_split=True,
        max_seq_length=64, batch_tokens=256, gradient_accumulation_steps=2, max_steps=3, warmup_steps=0,
        learning_rate=0.005, logging_steps=1, backend="hf"), train=dict(max_steps=2, eval_steps=0, save_steps=0))
    (repo / "data/mono/shiji.txt").write_text(mono, encoding="utf-8")  # git-ignored; DVC tracks data/mono
    proc = run(dvc + ["repro"], repo, env)
    assert "Running stage 'base'" in reproduced["repro"].stdout and "Running stage 'base'" not in proc.stdout
    for stage in ("pretrain", "train", "evaluate"):
        assert f"Running stage '{stage}'" in proc.stdout
    data = json.loads((repo / "reports/pretrain/data.json").read_text(encoding="utf-8"))
    assert data["sources"][0]["files_read"] == 1 and data["train_split_documents"] > 0
    assert data["removed_for_overlap"]["sources"]["sentences"] > 0
    metrics = json.loads((repo / "reports/pretrain/metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 3 and metrics["tokens"] == 3 * 256
    config = json.loads((repo / "models/adapter/training_config.json").read_text(encoding="utf-8"))
    assert config["model"] == "models/pretrain" and config["extend_vocab"]["added"] == 0
    assert json.loads((repo / "reports/metrics.json").read_text(encoding="utf-8"))["n_sentences"] == 6

    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "pretrained"], repo, env)
    first = {p: (repo / p).read_bytes() for p in ("reports/metrics.json", "reports/train/summary.json")}
    proc = run(dvc + ["exp", "run", "-S", "train.learning_rate=0.05", "-n", "lr05"], repo, env)
    assert "Running stage 'train'" in proc.stdout and "Running stage 'pretrain'" not in proc.stdout
    assert "Running stage 'evaluate_base'" not in proc.stdout
    table = run(dvc + ["exp", "show", "--csv"], repo, env).stdout
    assert "lr05" in table and "train.learning_rate" in table

    # Back to the first parameter set: DVC's run cache restores train's and evaluate's outputs, nothing runs
    proc = run(dvc + ["exp", "run", "-S", "train.learning_rate=0.01", "-n", "back"], repo, env)
    assert "Running stage" not in proc.stdout, proc.stdout
    assert "Stage 'train' is cached - skipping run" in proc.stdout and "Stage 'evaluate' is cached" in proc.stdout
    assert {p: (repo / p).read_bytes() for p in first} == first
