"""Tests of tools/review.py: two commits in a temporary git + DVC repository whose dvc.yaml carries this
project's evaluate stage and plots; the Markdown must show the right deltas, and `dvc plots diff` must
show both revisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools import review
from wenyan.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
SIGNATURE = "nrefs:1|bs:1000|seed:12345|case:mixed|eff:no|tok:zh|smooth:exp|version:2.6.0"


CHRF_SIGNATURE = "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"


def metrics(bleu, chrf, base_bleu=2.0, n=200, signature=SIGNATURE):
    """reports/metrics.json as the evaluate stage writes it, plus scores.csv (the signatures) under "_scores"."""
    return {
        "bleu": bleu, "chrf": chrf,
        "baselines": {"copy": {"bleu": 5.0, "chrf": 10.0}, "base": {"bleu": base_bleu, "chrf": 8.0}},
        "bleu_ci95": {"low": bleu - 1.5, "high": bleu + 1.5}, "n_sentences": n, "hit_max_new_tokens": 3,
        "_scores": ("system,n,bleu,bleu_low,bleu_high,chrf,hit_max_new_tokens,bleu_signature,chrf_signature\n"
                    f"model,{n},{bleu},{bleu - 1.5},{bleu + 1.5},{chrf},3,{signature},{CHRF_SIGNATURE}\n"
                    f"copy,{n},5.0,4.0,6.0,10.0,,{signature},{CHRF_SIGNATURE}\n"),
    }


def by_book(rows):
    header = "book,n,bleu,chrf,base_bleu,base_chrf,copy_bleu,copy_chrf\n"
    return header + "".join(f"{b},{n},{bleu},{chrf},1.0,5.0,4.0,9.0\n" for b, n, bleu, chrf in rows)


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def write(repo: Path, metrics_obj: dict, books: str, lengths: str) -> None:
    (repo / "reports" / "evaluate").mkdir(parents=True, exist_ok=True)
    metrics_obj = dict(metrics_obj)
    scores = metrics_obj.pop("_scores", None)
    (repo / "reports" / "metrics.json").write_text(json.dumps(metrics_obj, ensure_ascii=False), encoding="utf-8")
    if scores is not None:
        (repo / "reports" / "evaluate" / "scores.csv").write_text(scores, encoding="utf-8")
    (repo / "reports" / "evaluate" / "by_book.csv").write_text(books, encoding="utf-8")
    (repo / "reports" / "evaluate" / "by_length.csv").write_text(lengths, encoding="utf-8")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """git init + dvc init; dvc.yaml = this project's evaluate stage (its plots) and plot templates; two commits."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # dvc of this venv
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
                       "GIT_COMMITTER_EMAIL": "t@e"}.items():
        monkeypatch.setenv(key, value)
    project = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    dvc_yaml = {"stages": {"evaluate": project["stages"]["evaluate"]}}
    git(tmp_path, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    import shutil

    shutil.copytree(ROOT / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, allow_unicode=True), encoding="utf-8")
    lengths_old = "length,n,bleu,chrf\n1-10,50,12.0,18.0\n41+,20,6.0,15.0\n"
    write(tmp_path, metrics(10.0, 20.0), by_book([("论语", 40, 11.0, 21.0), ("史记", 60, 9.0, 19.0)]), lengths_old)
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first evaluation")
    lengths_new = "length,n,bleu,chrf\n1-10,50,15.0,18.0\n41+,20,6.0,15.0\n"
    write(tmp_path, metrics(12.5, 21.0), by_book([("论语", 40, 14.0, 21.0), ("史记", 60, 8.5, 19.5), ("孟子", 30, 7.0, 12.0)]),
          lengths_new)
    git(tmp_path, "commit", "-qam", "better model")
    return tmp_path


def test_review_of_two_commits_shows_metric_and_per_book_deltas(repo):
    out = repo / "review.md"
    review.main(["--old", "HEAD~1", "--new", "HEAD", "--out", str(out), "--repo", str(repo)])
    md = out.read_text(encoding="utf-8")
    assert md.startswith("## Evaluation: `HEAD~1` → `HEAD`")
    for line in [
        "| `bleu` | 10.00 | 12.50 | **+2.50** |",
        "| `bleu_ci95.low` | 8.50 | 11.00 | **+2.50** |",
        "| `chrf` | 20.00 | 21.00 | **+1.00** |",
        "| `n_sentences` | 200 | 200 | 0 |",
        "| `baselines.base.bleu` | 2.00 | 2.00 | 0 |",
        "| `baselines.copy.chrf` | 10.00 | 10.00 | 0 |",
        "| bleu gain over base | 8.00 | 10.50 | **+2.50** |",
        "| chrf gain over base | 12.00 | 13.00 | **+1.00** |",
        # per book: n, bleu old/new/Δ, chrf old/new/Δ
        "| 论语 | 40 | 11.00 | 14.00 | **+3.00** | 21.00 | 21.00 | 0 |",
        "| 史记 | 60 | 9.00 | 8.50 | -0.50 | 19.00 | 19.50 | +0.50 |",
        "| 孟子 | 30 | – | 7.00 |  | – | 12.00 |  |",
        "| 1-10 | 50 | 12.00 | 15.00 | **+3.00** | 18.00 | 18.00 | 0 |",
    ]:
        assert line in md, line
    assert md.index("`bleu`") < md.index("`chrf`") < md.index("baselines.base.bleu")
    assert "⚠️" not in md and f"`bleu_signature`: `{SIGNATURE}`" in md
    assert "dvc plots diff HEAD~1 HEAD" in md


def test_review_against_the_workspace_and_signature_change(repo, capsys):
    write(repo, metrics(13.0, 21.0, signature=SIGNATURE.replace("tok:zh", "tok:13a"), n=100),
          by_book([("论语", 40, 14.0, 21.0)]), "length,n,bleu,chrf\n")
    review.main(["--old", "HEAD", "--repo", str(repo)])
    md = capsys.readouterr().out
    assert "`HEAD` → `workspace`" in md
    assert "| `bleu` | 12.50 | 13.00 | +0.50 |" in md
    assert "⚠️ `bleu_signature` changed" in md and "different number of test sentences" in md
    assert "| 史记 | 60 | 8.50 | – |" in md


def test_dvc_plots_diff_shows_both_revisions(repo):
    """The plots declared in dvc.yaml render by_book.csv, by_length.csv and scores.csv for each revision, as
    grouped bars (.dvc/plots/scores_by_group.json: the model, copy and base side by side, a row per revision)."""
    done = subprocess.run(["dvc", "plots", "diff", "--json", "HEAD~1", "HEAD"], cwd=repo, check=True,
                          capture_output=True, text=True)
    data = json.loads(done.stdout)["data"]
    by_book = "reports/evaluate/by_book.csv"
    assert {by_book, "reports/evaluate/by_length.csv", "reports/evaluate/scores.csv"} <= set(data)
    spec = data[by_book][0]["content"]
    values = spec["data"]["values"]
    assert {(v["rev"], v["book"], float(v["bleu"])) for v in values} >= {("HEAD~1", "论语", 11.0), ("HEAD", "论语", 14.0)}
    assert spec["spec"]["mark"]["type"] == "bar" and spec["facet"]["row"]["field"] == "rev"


def test_review_of_a_dvc_experiment_by_name(repo, capsys):
    """`dvc exp run -n NAME` keeps the experiment's commit under refs/exps/.../NAME."""
    git(repo, "update-ref", "refs/exps/ab/cdef0123/better-lr", "HEAD")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    review.main(["--old", "HEAD", "--new", "better-lr", "--repo", str(repo)])
    md = capsys.readouterr().out
    assert "| `bleu` | 10.00 | 12.50 | **+2.50** |" in md and "| 论语 | 40 | 11.00 | 14.00 | **+3.00** |" in md


@pytest.mark.bad_input
def test_no_metrics_and_bad_revision(repo):
    assert "No evaluation metrics" in review.render({}, {}, "a", "b")
    with pytest.raises(PipelineError, match="neither a git revision nor a DVC experiment"):
        review.main(["--old", "no-such-rev", "--repo", str(repo)])


def test_fmt_delta():
    assert review.fmt_delta(1.0, 1.5) == "+0.50" and review.fmt_delta(2.0, 0.5) == "**-1.50**"
    assert review.fmt_delta(3, 5) == "+2" and review.fmt_delta(None, 1.0) == "" and review.fmt_delta(1.0, 1.0) == "0"


@pytest.mark.bad_input
@pytest.mark.parametrize("target", ["reports/metrics.json", "reports/evaluate/by_book.csv", "reports/evaluate/scores.csv"])
def test_out_onto_a_file_it_compares_is_refused_and_kept(repo, target):
    """--out may not be one of the workspace files the review reads (any spelling): it would overwrite them."""
    path = repo / target
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("kept\n", encoding="utf-8")
    before = path.read_bytes()
    spelled = repo / "reports" / ".." / target
    with pytest.raises(PipelineError, match="--out"):
        review.main(["--old", "HEAD", "--out", str(spelled), "--repo", str(repo)])
    assert path.read_bytes() == before
