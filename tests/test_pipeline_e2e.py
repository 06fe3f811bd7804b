"""The whole pipeline as a user runs it: `dvc repro` in a fresh git + DVC repo holding this project's
stages/, dvc.yaml and params.yaml, on a small slice of the built-in 史记 corpus and a tiny model built
here; then `dvc exp run -S ...` and `dvc metrics diff` see the change.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHIJI = REPO / "data/corpus/classical-modern/双语数据/史记"


def run(cmd, cwd, env, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def slice_corpus(dest: Path, chapters: int = 12, lines: int = 12) -> list[str]:
    """The first `lines` pairs of the first `chapters` chapters of 史记, in the original layout."""
    texts = []
    sources = sorted(SHIJI.rglob("source.txt"))[:chapters]
    for source in sources:
        chapter = source.parent
        out = dest / "双语数据/史记" / chapter.relative_to(SHIJI)
        out.mkdir(parents=True)
        for name in ("source.txt", "target.txt"):
            kept = (chapter / name).read_text(encoding="utf-8").splitlines()[:lines]
            (out / name).write_text("\n".join(kept) + "\n", encoding="utf-8")
            texts.extend(kept)
    return texts


def tiny_model(dest: Path, texts: list[str]) -> Path:
    """A 2-layer Llama with a BPE tokenizer trained on the slice (so characters are single tokens)."""
    from tiny import bpe_tokenizer, tiny_llama

    tok = bpe_tokenizer(texts + ["system user assistant\n"] * 5, vocab_size=3000)
    tiny_llama(tok).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def make_project(tmp_path: Path, train: dict | None = None, evaluate: dict | None = None, pretrain: dict | None = None):
    """A git + DVC repo at tmp_path/repo holding this project's stages/, wenyan/, dvc.yaml and params.yaml (scaled down
    to the 史记 slice and a tiny model at an absolute path, so queued experiments in .dvc/tmp/exps find it too),
    all committed. `train` / `evaluate` update those params sections. Returns (repo, env, dvc command)."""
    repo = tmp_path / "repo"
    for package in ("stages", "wenyan"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "data/mono", repo / "data/mono")  # pretrain's dependency (README + .gitignore)
    texts = slice_corpus(repo / "data/corpus/classical-modern")
    model = tiny_model(tmp_path / "tiny-llama", texts)

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["split"].update(valid_fraction=0.2, test_fraction=0.25)
    params["format"]["system_prompt"] = "翻译。"
    params["train"].update(model=str(model), chat_template=None, max_steps=3, warmup_steps=0, batch_tokens=0, batch_size=4,
                           eval_steps=2, eval_samples=4, save_steps=2, logging_steps=1, learning_rate=0.01)
    params["train"].update(train or {})
    params["evaluate"].update(num_samples=6, batch_size=6, bootstrap_resamples=50, num_examples=4)
    params["evaluate"].update(evaluate or {})
    params["pretrain"].update(pretrain or {})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")

    # The venv's bin on PATH: stages run `python -m ...`, and dvc's queue workers are spawned as `dvc`.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo, env)
    run(dvc + ["init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "project"], repo, env)
    return repo, env, dvc


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_repro_end_to_end_then_an_experiment(tmp_path):
    repo, env, dvc = make_project(tmp_path)
    proc = run(dvc + ["repro"], repo, env)
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

    # A second repro changes nothing; an experiment with another parameter shows in metrics diff.
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    assert "Running stage" not in run(dvc + ["repro"], repo, env).stdout
    first = {p: (repo / p).read_bytes() for p in ("reports/metrics.json", "reports/train/summary.json")}
    proc = run(dvc + ["exp", "run", "-S", "train.learning_rate=0.05", "-n", "lr05"], repo, env)
    assert "Running stage 'train'" in proc.stdout and "Running stage 'evaluate_base'" not in proc.stdout
    diff = run(dvc + ["exp", "show", "--csv"], repo, env).stdout
    assert "lr05" in diff and "train.learning_rate" in diff

    # Back to the first parameter set: DVC's run cache restores train's and evaluate's outputs, nothing runs
    proc = run(dvc + ["exp", "run", "-S", "train.learning_rate=0.01", "-n", "back"], repo, env)
    assert "Running stage" not in proc.stdout, proc.stdout
    assert "Stage 'train' is cached - skipping run" in proc.stdout and "Stage 'evaluate' is cached" in proc.stdout
    assert {p: (repo / p).read_bytes() for p in first} == first


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_pretrain_then_train_and_evaluate_and_a_train_experiment_keeps_it(tmp_path):
    """base -> pretrain (a few kB of other 史记 chapters, the train split too) -> train -> evaluate under dvc repro;
    `dvc exp run -S train.learning_rate=...` re-runs train and evaluate, never pretrain."""
    mono = "\n\n".join(c.read_text(encoding="utf-8") for c in sorted(SHIJI.rglob("source.txt"))[12:15]
                        ).replace("\n\n\n", "\n\n")[:6000]
    repo, env, dvc = make_project(tmp_path, pretrain=dict(
        enabled=True, sources=[{"path": "data/mono/shiji.txt", "format": "text"}], include_train_split=True,
        max_seq_length=64, batch_tokens=256, gradient_accumulation_steps=2, max_steps=3, warmup_steps=0,
        learning_rate=0.005, logging_steps=1, backend="hf"), train=dict(max_steps=2, eval_steps=0, save_steps=0))
    (repo / "data/mono/shiji.txt").write_text(mono, encoding="utf-8")  # git-ignored; DVC tracks data/mono
    proc = run(dvc + ["repro"], repo, env)
    for stage in ("base", "pretrain", "train", "evaluate"):
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
    proc = run(dvc + ["exp", "run", "-S", "train.learning_rate=0.05", "-n", "lr05"], repo, env)
    assert "Running stage 'train'" in proc.stdout and "Running stage 'pretrain'" not in proc.stdout
