"""The tiny DVC project the end-to-end tests run: a fresh git + DVC repo holding this repository's stages/, wenyan/,
tools/, dvc.yaml, .gitignore, .dvc/config and plot templates, a slice of the built-in 史记 corpus, and params.yaml
scaled down to it and to a tiny model built here (at an absolute path outside the repo, so that queued experiments
in .dvc/tmp/exps find it too).

conftest.py reproduces it once a session (fixture `reproduced`); a test that changes it works on a copy
(`project_copy`): a full `dvc repro` costs about a minute on 2 CPU cores, a copy well under a second.

    env = environment(); make_project(repo, model, env)   # committed, not reproduced
    run(DVC + ["repro"], repo, env)                        # asserts exit 0, returns the CompletedProcess
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHIJI = REPO / "data/corpus/classical-modern/双语数据/史记"
DVC = [sys.executable, "-m", "dvc"]


def run(cmd, cwd, env, ok=True, timeout=1200) -> subprocess.CompletedProcess:
    """cmd in cwd; with ok, asserts it exited 0 (the message: the ends of its stdout and stderr)."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def environment() -> dict:
    """The venv's bin first on PATH (stages run `python -m ...`, dvc's queue workers are spawned as `dvc`), a git
    identity, no analytics, no hub, one OpenMP thread; no PYTHONPATH, so `python -m stages.X` in the project imports
    the project's own copy."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return env


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


def scaled_params(model: Path) -> dict:
    """The shipped params.yaml scaled to the slice and the tiny model: 3 train steps (eval and a checkpoint every 2),
    6 test sentences."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["split"].update(valid_fraction=0.2, test_fraction=0.25)
    params["format"]["system_prompt"] = "翻译。"
    params["train"].update(model=str(model), chat_template=None, max_steps=3, warmup_steps=0, batch_tokens=0, batch_size=4,
                           eval_steps=2, eval_samples=4, save_steps=2, logging_steps=1, learning_rate=0.01)
    params["evaluate"].update(num_samples=6, batch_size=6, bootstrap_resamples=50, num_examples=4)
    return params


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


def update_params(repo: Path, **sections: dict) -> dict:
    """params.yaml with each given section updated (train={...}, evaluate={...}); returns the new params."""
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    for name, values in sections.items():
        params[name].update(values)
    write_params(repo, params)
    return params


def make_project(repo: Path, model: Path, env: dict) -> None:
    """This repository's code, dvc.yaml, .gitignore, .dvc/config and plot templates, the 史记 slice, params.yaml
    scaled to it (the tiny model built at `model` unless it is there); git + DVC initialised, all committed."""
    for package in ("stages", "wenyan", "tools"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    shutil.copytree(REPO / "data/mono", repo / "data/mono")  # pretrain's dependency (README + .gitignore)
    texts = slice_corpus(repo / "data/corpus/classical-modern")
    if not model.exists():
        tiny_model(model, texts)
    write_params(repo, scaled_params(model))
    run(["git", "init", "-q"], repo, env)
    run(DVC + ["init", "-q"], repo, env)
    shutil.copy(REPO / ".dvc/config", repo / ".dvc/config")
    shutil.copytree(REPO / ".dvc/plots", repo / ".dvc/plots")
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "project"], repo, env)


def copy_project(repo: Path, dest: Path) -> Path:
    """A copy of a project at dest: its git history, dvc.lock, DVC cache (run cache included) and workspace
    outputs; .dvc/tmp (locks, DVC's file-hash state, experiment workers) starts empty, as in a fresh clone."""
    shutil.copytree(repo, dest, symlinks=True, ignore=lambda d, names: ["tmp"] if Path(d).name == ".dvc" else [])
    return dest
