"""Review: what changed in the evaluation between two revisions, as Markdown for a pull request.

Not a pipeline stage: it reads what the evaluate stage committed (reports/metrics.json through
`dvc metrics diff`, reports/evaluate/by_book.csv, by_length.csv and scores.csv (the BLEU/chrF signatures)
through `git show`) and prints
one Markdown comment: the metrics with old / new / delta, the model's gain over the base model, and
per-book and per-length BLEU/chrF deltas. .github/workflows/metrics-diff.yml posts it on every PR.

Run it:  python -m tools.review --old main                  # main vs the workspace
         python -m tools.review --old main --new HEAD --out review.md
         python -m tools.review --old HEAD --new my-exp     # a `dvc exp run -n my-exp` experiment
Plots of the same comparison:  dvc plots diff main HEAD   (then open dvc_plots/index.html)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

from wenyan.errors import PipelineError, run_main
from wenyan.files import check_output_path, check_paths, write_text

# Metrics in the order a reviewer reads them; any other metric follows in dvc's order.
FIRST = ["bleu", "bleu_ci95.low", "bleu_ci95.high", "chrf", "n_sentences", "hit_max_new_tokens"]
SIGNATURES = ["bleu_signature", "chrf_signature"]
WORKSPACE = "workspace"


def resolve_rev(rev: str, cwd=".") -> str:
    """A git revision as is; a DVC experiment name (`dvc exp run -n NAME`, shown by `dvc exp show`) as the
    commit of its ref under refs/exps, so that `git show` reads it too."""
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode == 0:
        return rev
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], cwd=cwd,
                          capture_output=True, text=True).stdout.split("\n")
    matches = [line.split()[1] for line in refs if line.strip() and line.split()[0].endswith(f"/{rev}")]
    if len(matches) == 1:
        return matches[0]
    raise PipelineError(f"'{rev}' is neither a git revision nor a DVC experiment of {Path(cwd).resolve()}")


def metrics_diff(old: str, new: str | None, metrics_path: str, cwd=".") -> dict:
    """`dvc metrics diff --json --all old [new]` for one metrics file: {metric: {"old", "new", "diff"?}}."""
    cmd = ["dvc", "metrics", "diff", "--json", "--all", old] + ([new] if new else [])
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise PipelineError("dvc is not on PATH (pip install dvc)") from None
    except subprocess.CalledProcessError as exc:
        raise PipelineError(f"{' '.join(cmd)} failed: {exc.stderr.strip() or exc.stdout.strip()}") from None
    diff = json.loads(done.stdout or "{}")
    # dvc names the file as given in dvc.yaml, relative to the repo root
    for path, metrics in diff.items():
        if Path(path) == Path(metrics_path):
            return metrics
    return {}


def read_csv_at(rev: str | None, path: str, cwd=".") -> list[dict] | None:
    """Rows of a CSV committed at `rev` (None = the workspace); None where the file does not exist."""
    if rev is None:
        file = Path(cwd) / path
        return list(csv.DictReader(io.StringIO(file.read_text(encoding="utf-8")))) if file.is_file() else None
    done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        if "exists on disk, but not in" in done.stderr or "does not exist in" in done.stderr:
            return None
        raise PipelineError(f"git show {rev}:{path} failed: {done.stderr.strip()}")
    return list(csv.DictReader(io.StringIO(done.stdout)))


# ----------------------------------------------------------------------------------------------
# Rendering


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def fmt_delta(old, new) -> str:
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return ""
    delta = new - old
    if abs(delta) < 1e-9:
        return "0"
    text = f"{delta:+.2f}" if isinstance(delta, float) else f"{delta:+d}"
    return f"**{text}**" if isinstance(delta, float) and abs(delta) >= 1 else text  # a score moved 1 point


def ordered(names) -> list[str]:
    names = list(names)
    head = [n for n in FIRST if n in names]
    baselines = sorted(n for n in names if n.startswith("baselines."))
    rest = [n for n in names if n not in head and n not in baselines and n not in SIGNATURES]
    return head + baselines + rest


def metrics_table(diff: dict) -> list[str]:
    lines = ["| Metric | Old | New | Δ |", "|---|---:|---:|---:|"]
    for name in ordered(diff):
        old, new = diff[name].get("old"), diff[name].get("new")
        lines.append(f"| `{name}` | {fmt(old)} | {fmt(new)} | {fmt_delta(old, new)} |")
    # the number a reviewer wants first: how much fine-tuning adds over the base model
    for metric in ("bleu", "chrf"):
        base = diff.get(f"baselines.base.{metric}")
        model = diff.get(metric)
        if base and model:
            gains = []
            for side in ("old", "new"):
                m, b = model.get(side), base.get(side)
                gains.append(m - b if isinstance(m, (int, float)) and isinstance(b, (int, float)) else None)
            lines.append(
                f"| {metric} gain over base | {fmt(gains[0])} | {fmt(gains[1])} | {fmt_delta(gains[0], gains[1])} |"
            )
    return lines


def breakdown_table(key: str, old_rows, new_rows, metrics=("bleu", "chrf")) -> list[str]:
    """One row per group (book, length bucket) in either revision: n and each metric old -> new (Δ)."""
    old_by = {r[key]: r for r in old_rows or []}
    new_by = {r[key]: r for r in new_rows or []}
    groups = list(new_by) + [g for g in old_by if g not in new_by]
    header = f"| {key} | n | " + " | ".join(f"{m} old | {m} new | Δ {m}" for m in metrics) + " |"
    lines = [header, "|---|---:|" + "---:|" * (3 * len(metrics))]
    for group in groups:
        o, n = old_by.get(group, {}), new_by.get(group, {})
        cells = [group, n.get("n") or o.get("n") or ""]
        for m in metrics:
            ov, nv = _num(o.get(m)), _num(n.get(m))
            cells += [fmt(ov), fmt(nv), fmt_delta(ov, nv)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def signatures(diff: dict, old_scores, new_scores) -> dict[str, tuple]:
    """{bleu_signature: (old, new), chrf_signature: ...}: the model's row of reports/evaluate/scores.csv at each
    revision, or, for a revision from before scores.csv, the signature metrics its metrics.json still had."""
    found = {}
    for name in SIGNATURES:
        sides = []
        for side, rows in (("old", old_scores), ("new", new_scores)):
            model = next((r for r in rows or [] if r.get("system") == "model"), None)
            sides.append(model.get(name) if model and model.get(name) else diff.get(name, {}).get(side))
        if any(sides):
            found[name] = tuple(sides)
    return found


def render(diff: dict, breakdowns: dict[str, tuple], old: str, new: str, sigs: dict | None = None) -> str:
    """The whole comment. breakdowns: {title: (key column, old rows, new rows)}; sigs: signatures()."""
    out = [f"## Evaluation: `{old}` → `{new}`", ""]
    if not diff:
        out += ["No evaluation metrics at either revision (reports/metrics.json).", ""]
        return "\n".join(out)
    out += metrics_table(diff)
    out.append("")
    notes = []
    sigs = sigs if sigs is not None else signatures(diff, None, None)
    for name in SIGNATURES:
        if name in sigs:
            o, n = sigs[name]
            if o != n and o is not None and n is not None:
                notes.append(f"⚠️ `{name}` changed (`{o}` → `{n}`): the scores are not directly comparable.")
            elif n is not None:
                notes.append(f"`{name}`: `{n}`")
    if "n_sentences" in diff and diff["n_sentences"].get("old") != diff["n_sentences"].get("new"):
        notes.append("⚠️ A different number of test sentences: the scores are on different samples.")
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    for title, (key, old_rows, new_rows) in breakdowns.items():
        if old_rows is None and new_rows is None:
            continue
        out += [f"<details{' open' if key == 'book' else ''}><summary>{title}</summary>", ""]
        out += breakdown_table(key, old_rows, new_rows)
        out += ["", "</details>", ""]
    plots = f"dvc plots diff {old}" + ("" if new == WORKSPACE else f" {new}")
    out += [f"Deltas of 1 point or more are in bold. The same comparison as plots: `{plots}`", ""]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="git revision or DVC experiment name to compare against")
    parser.add_argument("--new", default=None, help="git revision or DVC experiment name (default: the workspace)")
    parser.add_argument("--metrics", default="reports/metrics.json")
    parser.add_argument("--by-book", default="reports/evaluate/by_book.csv")
    parser.add_argument("--by-length", default="reports/evaluate/by_length.csv")
    parser.add_argument("--scores", default="reports/evaluate/scores.csv", help="per system, with the signatures")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: stdout)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root")
    args = parser.parse_args(argv)
    if args.out:
        check_output_path(args.out)
        # the workspace files it compares (--new unset reads them from the working tree) are never its output
        check_paths({flag: args.repo / path for flag, path in (("--metrics", args.metrics), ("--by-book", args.by_book),
                     ("--by-length", args.by_length), ("--scores", args.scores))}, {"--out": args.out})

    old = resolve_rev(args.old, args.repo)
    new = resolve_rev(args.new, args.repo) if args.new else None
    diff = metrics_diff(old, new, args.metrics, cwd=args.repo)
    breakdowns = {
        "BLEU / chrF by book": ("book", read_csv_at(old, args.by_book, args.repo),
                                read_csv_at(new, args.by_book, args.repo)),
        "BLEU / chrF by source length (characters)": ("length", read_csv_at(old, args.by_length, args.repo),
                                                      read_csv_at(new, args.by_length, args.repo)),
    }
    sigs = signatures(diff, read_csv_at(old, args.scores, args.repo), read_csv_at(new, args.scores, args.repo))
    markdown = render(diff, breakdowns, args.old, args.new or WORKSPACE, sigs)
    if args.out:
        write_text(args.out, markdown)
    else:
        sys.stdout.write(markdown)


if __name__ == "__main__":
    run_main(main)
