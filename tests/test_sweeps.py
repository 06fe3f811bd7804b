"""A sweep as a user runs it (README "Sweeps"): two experiments queued at once with Hydra's choice syntax,
`dvc exp run --queue -S 'train.learning_rate=0.05,0.001' -n lr`, run two at a time by `dvc queue start -j 2`,
waited for with `dvc queue status`, compared with `dvc exp show` and `dvc exp diff lr-1 lr-2`, then the
better one kept (`dvc exp branch`, `dvc exp apply`) and the other removed (`dvc exp remove`).

Queued experiments run in copies of the last commit under .dvc/tmp/exps, through celery workers started
as `dvc` from PATH: the project is committed first, the tiny model sits at an absolute path outside the repo,
and the venv's bin directory leads PATH (tests/project.py does all three). The sweep runs in a copy of the
project reproduced once a session (conftest's `reproduced`): the data stages and base come from DVC's cache,
only train and evaluate run.

    python -m pytest tests/test_sweeps.py -s      # ~1.5 minutes on 2 CPU cores with the project's own repro
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from project import DVC, run, update_params

SWEEP_TIMEOUT_S = 900  # two tiny experiments take ~1.5 minutes on 2 CPU cores; the rest is slack for a busy CI
NAMES = ("lr-1", "lr-2")  # -n lr with a two-value sweep names the experiments lr-1 and lr-2, in order
# dvc exp show's columns for a sweep (matched from the start of a column's name)
KEEP = r"Experiment|(params.yaml:)?train\.learning_rate|bleu$|chrf$|train\.loss"


def wait_for_queue(repo, env, dvc, timeout_s: float) -> str:
    """Poll `dvc queue status` until no task is Queued or Running; return its last output."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run(dvc + ["queue", "status"], repo, env).stdout
        if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
            return status
        time.sleep(2)


def queue_logs(repo, env, dvc) -> str:
    logs = []
    for name in NAMES:
        proc = subprocess.run(dvc + ["queue", "logs", name], cwd=repo, env=env, capture_output=True, text=True)
        logs.append(f"--- dvc queue logs {name}\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
    return "\n".join(logs)


def exp_rows(show: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` (DVC 3): one entry per baseline commit, its experiments under "experiments"."""
    rows = {}
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                rows[rev["name"]] = rev
    return rows


@pytest.mark.slow
def test_queued_sweep_runs_two_at_a_time_then_exp_show_and_diff_compare(reproduced, project_copy):
    # Cheaper than the end-to-end run: 2 steps, no checkpoints, 4 test sentences, only the copy baseline; committed.
    repo, env, dvc = project_copy, reproduced["env"], DVC
    update_params(repo, train={"max_steps": 2, "eval_steps": 0, "save_steps": 0},
                  evaluate={"num_samples": 4, "batch_size": 4, "baselines": ["copy"], "bootstrap_resamples": 0})
    run(["git", "commit", "-qam", "sweep settings"], repo, env)
    queued = run(dvc + ["exp", "run", "--queue", "-S", "train.learning_rate=0.05,0.001", "-n", "lr"], repo, env)
    for name in NAMES:
        assert f"Queued experiment '{name}'" in queued.stdout, queued.stdout

    try:
        start = time.monotonic()
        run(dvc + ["queue", "start", "-j", "2"], repo, env)
        status = wait_for_queue(repo, env, dvc, SWEEP_TIMEOUT_S)
        print(f"\ntwo queued experiments with -j 2: {time.monotonic() - start:.0f} s\n{status}")
        for name in NAMES:
            assert re.search(rf"\b{name}\b.*\bSuccess\b", status), f"{status}\n{queue_logs(repo, env, dvc)}"

        rows = exp_rows(json.loads(run(dvc + ["exp", "show", "--json"], repo, env).stdout))
        assert set(NAMES) <= set(rows), f"dvc exp show lists {sorted(rows)}"
        for name, lr in zip(NAMES, (0.05, 0.001)):
            data = rows[name]["data"]
            assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == lr
            metrics = data["metrics"]
            assert metrics["reports/metrics.json"]["data"]["bleu"] >= 0
            assert metrics["reports/metrics.json"]["data"]["n_sentences"] == 4
            assert metrics["reports/train/metrics.json"]["data"]["step"] == 2
            assert metrics["reports/train/metrics.json"]["data"]["train"]["loss"] > 0
        losses = [rows[n]["data"]["metrics"]["reports/train/metrics.json"]["data"]["train"]["loss"] for n in NAMES]
        assert losses[0] != losses[1], "the two learning rates trained the same model"

        diff = json.loads(run(dvc + ["exp", "diff", *NAMES, "--all", "--json"], repo, env).stdout)
        lr_diff = diff["params"]["params.yaml"]["train.learning_rate"]
        assert (lr_diff["old"], lr_diff["new"]) == (0.05, 0.001), lr_diff
        assert {"bleu", "chrf"} <= set(diff["metrics"]["reports/metrics.json"])
        assert "train.loss" in diff["metrics"]["reports/train/metrics.json"]
        table = run(dvc + ["exp", "diff", *NAMES], repo, env).stdout  # what a user reads: only what changed
        assert "train.learning_rate" in table and "0.05" in table and "0.001" in table, table
        table = run(dvc + ["exp", "show", "--drop", ".*", "--keep", KEEP, "--sort-by", "reports/metrics.json:bleu",
                           "--sort-order", "desc"], repo, env).stdout
        assert all(name in table for name in NAMES) and "bleu" in table and "learning_rate" in table, table

        # Keep the better one (here: lower train loss; on a real model, BLEU) as a branch and in the workspace.
        best, other = sorted(NAMES, key=lambda n: losses[NAMES.index(n)])
        best_lr = rows[best]["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"]
        run(dvc + ["exp", "branch", best, "sweep-best"], repo, env)
        branch_params = run(["git", "show", "sweep-best:params.yaml"], repo, env).stdout
        assert f"learning_rate: {best_lr}" in branch_params
        run(dvc + ["exp", "apply", best], repo, env)
        assert f"learning_rate: {best_lr}" in (repo / "params.yaml").read_text(encoding="utf-8")
        assert (repo / "reports/metrics.json").is_file() and (repo / "models/adapter/training_config.json").is_file()
        run(dvc + ["exp", "remove", other], repo, env)
        assert other not in exp_rows(json.loads(run(dvc + ["exp", "show", "--json"], repo, env).stdout))
    finally:
        subprocess.run(dvc + ["queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120)
