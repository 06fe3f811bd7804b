"""End to end: `dvc repro format` in a fresh git + DVC repo with the four data stages and a tiny corpus.

This is what a user runs; it also checks that each stage reads its params through DVC (params_show)
and that dvc.yaml's commands and paths match the stages' arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BASE_PARAMS, CHAPTERS, REPO, write_chapters

DATA_STAGES = ("ingest", "clean", "split", "format")
STAGES = ("check_params", *DATA_STAGES)  # check_params runs first: ingest depends on its output


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_repro_format(tmp_path):
    repo = tmp_path / "repo"
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    dvc_yaml["stages"] = {k: v for k, v in dvc_yaml["stages"].items() if k in STAGES}
    # the code of the data stages only: each one's declared code deps (tests/test_layout.py: exactly its imports)
    code = {d for spec in dvc_yaml["stages"].values() for d in spec["deps"] if d.endswith(".py")}
    for name in sorted(code | {"stages/__init__.py", "wenyan/__init__.py"}):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    assert set(dvc_yaml["stages"]) == set(STAGES)
    dvc_yaml["stages"]["check_params"]["params"] = list(DATA_STAGES)  # the params sections of the data stages only
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, allow_unicode=True, sort_keys=False), encoding="utf-8")
    params = {k: v for k, v in BASE_PARAMS.items()}
    params["ingest"] = {"sources": [{"path": "data/corpus/classical-modern", "format": "niutrans", "books": [], "encoding": "utf-8"}], "on_misaligned": "error"}
    params["split"] = {**params["split"], "valid_fraction": 0.3, "test_fraction": 0.3}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    # 12 small chapters, so that every split gets some with these fractions
    chapters = dict(CHAPTERS)
    for i in range(9):
        chapters[f"孟子/篇{i}"] = ([f"孟子曰：第{i}篇之一。", f"孟子曰：第{i}篇之二。"], [f"孟子说：第{i}篇第一句。", f"孟子说：第{i}篇第二句。"])
    write_chapters(repo / "data/corpus/classical-modern/双语数据", chapters)

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1")
    env.pop("PYTHONPATH", None)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo, env)
    run(dvc + ["init", "-q"], repo, env)
    proc = run(dvc + ["repro", "format"], repo, env)

    for s in DATA_STAGES:
        assert f"Running stage '{s}'" in proc.stdout
        assert (repo / "reports/data" / f"{s}.json").is_file()
    assert (repo / "data/ingest/pairs.parquet").is_file() and (repo / "data/clean/pairs.parquet").is_file()
    assert {p.name for p in (repo / "data/split").iterdir()} == {"train.parquet", "valid.parquet", "test.parquet"}
    rows = {s: (repo / "data/format" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines() for s in ("train", "valid", "test")}
    assert all(rows.values())
    first = json.loads(rows["train"][0])
    assert first["messages"][-1]["content"] == first["target"]
    ingest = json.loads((repo / "reports/data/ingest.json").read_text(encoding="utf-8"))
    assert ingest["pairs"] == sum(len(s) for s, _ in chapters.values())
    clean = json.loads((repo / "reports/data/clean.json").read_text(encoding="utf-8"))
    split = json.loads((repo / "reports/data/split.json").read_text(encoding="utf-8"))
    assert split["pairs"] == clean["pairs_kept"] == sum(len(r) for r in rows.values())
    assert "軒轅" not in "".join(rows["train"] + rows["valid"] + rows["test"])  # t2s ran
    assert (repo / "dvc.lock").is_file()
    # nothing changed: a second repro runs no stage
    again = run(dvc + ["repro", "format"], repo, env)
    assert "Running stage" not in again.stdout
