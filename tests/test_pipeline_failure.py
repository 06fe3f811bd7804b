"""A failed `dvc repro` must not corrupt the last good reports/: in a copy of the tiny project reproduced
once a session (tests/project.py, conftest's `reproduced`: a good run, committed), then a bad parameter (refused by check_params before anything is deleted), a
middle stage failing (train, on a LoRA target the model lacks) and the first data stage failing (ingest, on a
line appended to one side of a corpus chapter).

Each failure must print one clear `error:` line (no traceback); every other stage's reports stay byte-identical
and no file is added. The failing stage's own reports are deleted by DVC before it runs (no output is
`persist: true`, so that DVC's run cache works: the trade-off dvc.yaml and the README explain); the stages
write them only at the very end, so none is ever half-written, and `git checkout -- reports; dvc checkout`
restores them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from project import run

pytestmark = [pytest.mark.slow, pytest.mark.bad_input]


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory.parent).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def repro_fails(repo: Path, env: dict, stage: str, message: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"failed to reproduce '{stage}'" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], output[-3000:]
    return errors[0]


def check_reports_kept(repo: Path, env: dict, before: dict, failed_stage: str, own: tuple[str, ...]) -> None:
    """No report added or changed; only the failed stage's own reports (paths starting with `own`) may be
    missing (DVC deletes a stage's outputs before running it), and git restores them."""
    after = snapshot(repo / "reports")
    assert set(after) <= set(before), f"after '{failed_stage}' failed: added {sorted(set(after) - set(before))}"
    removed = sorted(set(before) - set(after))
    assert all(path.startswith(own) for path in removed), f"removed after '{failed_stage}' failed: {removed}"
    changed = [path for path in after if after[path] != before[path]]
    assert not changed, f"changed after '{failed_stage}' failed: {changed}"
    run(["git", "checkout", "--", "reports"], repo, env)  # the git-tracked reports
    run([sys.executable, "-m", "dvc", "checkout"], repo, env)  # the DVC-cached ones (summary.json, samples.md)
    assert snapshot(repo / "reports") == before
    assert run(["git", "status", "--porcelain", "--", "reports"], repo, env).stdout == ""


def test_failed_repro_keeps_the_last_good_reports(reproduced, project_copy):
    repo, env = project_copy, reproduced["env"]
    corpus = repo / "data/corpus/classical-modern"
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    assert run(["git", "status", "--porcelain"], repo, env).stdout == ""  # the good run, committed
    before = snapshot(repo / "reports")
    assert {"reports/data/ingest.json", "reports/data/clean.json", "reports/train/summary.json", "reports/metrics.json",
            "reports/evaluate/samples.md"} <= set(before)

    # 1. A bad parameter: check_params, the first stage, refuses it before DVC deletes any output
    params["train"]["chat_template"] = "vicuna"
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    repro_fails(repo, env, "check_params", "chat_template 'vicuna' is unknown")
    check_reports_kept(repo, env, before, "check_params", ())
    run(["git", "checkout", "--", "params.yaml"], repo, env)

    # 2. A middle stage fails at run time: train, on a LoRA target the model lacks (a check that needs the model,
    # so check_params passes it; ingest .. format are up to date and do not run)
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))  # as committed again
    params["train"]["target_modules"] = ["q_proj", "qkv_proj"]
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    repro_fails(repo, env, "train", "'qkv_proj' match(es) no layer")
    check_reports_kept(repo, env, before, "train", ("reports/train/", "reports/pretrain/"))
    run(["git", "checkout", "--", "params.yaml"], repo, env)

    # 3. A bad corpus: one line more in a chapter's source.txt than in its target.txt; ingest fails
    source = sorted(corpus.rglob("source.txt"))[0]
    with open(source, "a", encoding="utf-8") as f:
        f.write("此句无译文。\n")
    error = repro_fails(repo, env, "ingest", "misaligned")
    assert "source.txt" in error and "ingest.on_misaligned" in error  # the file, and what to do
    check_reports_kept(repo, env, before, "ingest", ("reports/data/ingest.json",))
