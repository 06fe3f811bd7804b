"""The local web page: translate pasted or uploaded Classical Chinese with a trained model, and compare the runs.

    python -m tools.serve                       # http://127.0.0.1:8765/ (printed); models found under models/
    python -m tools.serve --model models/export/model-Q8_0.gguf --port 0    # a free port
    python -m tools.serve --no-experiments      # the runs view without `dvc exp show` (run each time it loads)

Two views, both server-rendered HTML with inline CSS, JS and SVG: nothing is fetched from anywhere but this
server, so the page works offline (no fonts, scripts or plots from the network).

- Translate (/): paste text or pick a .txt file (read in the browser), choose a model (a train/export directory
  or a GGUF the export stage wrote; those under models/ and those given with --model are listed, and a path can
  be typed: it is loaded only if its real path is inside models/ or a --model), and the sentence-by-sentence
  translation appears as each sentence is done (a progress bar), each source sentence beside its translation;
  copy or download the result (one output line per input line, as `wenyan-translate` writes it). The work is
  tools.translate's Translator: the same splitting, prompts and decoding as the command.
- Runs (/runs): the current reports/ and every committed run under reports/runs/ (any folder with a metrics.json,
  nested arms such as h200-pretrain-arms/C listed by their path under their parent) side by side: BLEU (95% CI)
  and chrF with the copy-the-source and untuned-base baselines, per-book BLEU bars with the baselines beside the
  model (the colours of the dvc plots templates, .dvc/plots/), and the training and eval loss curves; then the
  DVC experiments (`dvc exp show`: the workspace, the commit, its experiments, each with the params it changed
  and its scores), or a note saying why there are none. A damaged report is marked on its run, never a broken page.

Starlette (ASGI) served by uvicorn on 127.0.0.1 only. Translation streams as NDJSON from POST /api/translate;
GET /api/runs and /api/experiments give the runs view's figures as JSON.

What a page on this machine is exposed to, and what it does about it:
- Other sites the user visits (cross-origin requests, DNS rebinding): a request whose Host is not this machine
  (localhost, 127.0.0.1, [::1] or --host, any port) or whose Origin is not this page's own is refused (403);
  a POST must be JSON (Content-Type application/json: a cross-site form cannot send it without a preflight).
- Paths typed as the model: resolved to their real path ('..', symlinks) and loaded only from models/ or a
  --model; one loaded model per real path (the last MODELS_KEPT used), dropped when its files change or vanish.
- Run folders: looked for under reports/runs/ at most RUNS_DEPTH deep, never through a symlinked folder; a report
  whose real path is outside reports/runs/ (a link out) is not read, and says so on its run.
- DVC experiments: `dvc exp show --json` in the project, stopped after EXPERIMENTS_TIMEOUT_S; DVC's analytics off.
- Request bodies: Content-Length required and at most MAX_BODY_BYTES, checked before reading; reading stops there.
- Jobs: one translation at a time; a job stops at its next sentence (or, with transformers, its next token) when
  its client goes away or it runs past --timeout, and frees the model for the next one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import errno
import gc
import html
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from wenyan.artifacts import Check, Optional, check
from wenyan.artifacts import read_json as read_artifact
from wenyan.artifacts import read_text
from wenyan.errors import PipelineError, get_logger, run_main

log = get_logger("serve")

DEFAULT_PORT = 8765
MAX_TEXT_CHARS = 200_000
MAX_BODY_BYTES = 6 * MAX_TEXT_CHARS + 65_536  # the text JSON-escaped at worst (\uXXXX a character) + the model path
JOB_TIMEOUT_S = 3600.0  # a page's text (200,000 characters) takes ~20 min on a laptop's CPU with a GGUF
MODELS_KEPT = 2  # loaded models kept: two to compare, not one per model ever used
POLL_S = 0.25  # how often a waiting job or a quiet stream looks for a cancel or a gone client
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
BOOKS_SHOWN = 12


# ----------------------------------------------------------------------------------------------
# Models and runs on disk


def real_path(path: Path) -> Path:
    """The path with '..' and every symlink resolved (the file that would be opened)."""
    return Path(os.path.realpath(path))


def model_roots(root: Path, given: list[Path]) -> list[Path]:
    """Where a model may be loaded from: the project's models/ and each --model (real paths)."""
    return [real_path(root / "models")] + [real_path(Path(p)) for p in given]


def allowed_model(spelling: str | Path, root: Path, roots: list[Path]) -> Path:
    """The real path of a model spelled relative to root or absolute, if it is inside one of roots; else
    PipelineError. Any spelling of one model ('..', a trailing slash, a symlink to it) gives the same path."""
    path = Path(spelling)
    try:
        real = real_path(path if path.is_absolute() else root / path)
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long
        raise PipelineError(f"{spelling!r}: not a usable path ({exc})") from None
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise PipelineError(f"{spelling}: not one of this project's models; the page loads models only from "
                            f"{roots[0]}/ and those given with --model (restart it with --model PATH to add one)")
    return real


def find_models(root: Path, given: list[Path]) -> list[dict]:
    """Models to offer: those given, then the train stage's adapter, the export's merged model and GGUF files
    (one entry per real path; only those the page would load, see allowed_model)."""
    candidates = list(given)
    candidates += [root / "models" / "adapter", root / "models" / "export" / "hf"]
    candidates += sorted((root / "models" / "export").glob("*.gguf"))
    roots = model_roots(root, given)
    seen, out = set(), []
    for path in candidates:
        path = Path(path)
        ok = path.is_file() and path.suffix == ".gguf" and (path.parent / "training_config.json").is_file() or \
            path.is_dir() and (path / "training_config.json").is_file()
        if not ok:
            continue
        try:
            key = str(allowed_model(path, root, roots))
        except PipelineError:  # e.g. models/adapter a symlink to somewhere else
            continue
        if key not in seen:
            seen.add(key)
            out.append({"path": str(path), "kind": "GGUF (llama.cpp)" if path.suffix == ".gguf" else "transformers"})
    return out


# The reports the runs view reads, checked as every artifact is (wenyan.artifacts): a damaged one is one line
# naming the file and the field, shown on its run.
REPORT_FIX = "rerun the stage that writes it, or remove the run folder"


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float (1e400 written as digits)
        return False


NUMBER = Check(float, _finite, "a finite number")
SCORES = Optional({"bleu": Optional(NUMBER), "chrf": Optional(NUMBER)})
METRICS = {  # reports/metrics.json (evaluate), as the table shows it; a null is as good as absent (shown as -)
    "bleu": Optional(NUMBER),
    "chrf": Optional(NUMBER),
    "n_sentences": Optional(Check(int, lambda v: v >= 0, "an integer >= 0")),
    "bleu_ci95": Optional({"low": Optional(NUMBER), "high": Optional(NUMBER)}),
    "baselines": Optional({"base": SCORES, "copy": SCORES}),
    "bleu_signature": Optional(str),
}
TRAIN_METRICS = {"step": Optional(NUMBER), "eval": Optional({"loss": Optional(NUMBER)})}  # train/metrics.json
SUMMARY = {}  # train/summary.json: any mapping, shown as it is (in /api/runs)
BOOK_NUMBERS = ("bleu", "chrf", "base_bleu", "base_chrf", "copy_bleu", "copy_chrf")  # evaluate/by_book.csv
CURVES = {  # each curve from the first of these a run has: an evaluated run's train/, a pretrain run, a speed arm
    "train loss": ("train/plots/metrics/train/loss.tsv", "plots/metrics/train/loss.tsv", "loss.tsv"),
    "eval loss": ("train/plots/metrics/eval/loss.tsv",),
}
RUNS_DEPTH = 4  # reports/runs/<run>/<arm>/<variant>/<one more>: deeper folders are not looked in
RUN_PARTS = ("benchmarks", "data", "evaluate", "export", "plots", "pretrain", "screenshots", "train")  # as in reports/


def non_finite(value, field: str = "") -> str | None:
    """The field path of the first NaN, infinity or too-large number anywhere in a JSON value, or None
    (JSON from Python may hold NaN and Infinity, which no report means and /api/runs cannot send)."""
    if isinstance(value, float) or isinstance(value, int) and not isinstance(value, bool):
        return None if _finite(value) else field or "(the value)"
    if isinstance(value, dict):
        items = ((f"{field}.{key}" if field else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{field}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    for where, item in items:
        found = non_finite(item, where)
        if found:
            return found
    return None


def without_nulls(value):
    """A JSON value with its null-valued keys left out (the page shows a null as it shows an absent value)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return [without_nulls(v) for v in value] if isinstance(value, list) else value


def check_report(value, spec, where: str, fix: str = REPORT_FIX) -> dict:
    """A report's JSON value checked against spec, every number finite, its nulls left out; PipelineError (one
    line naming where and the field) when it does not fit."""
    try:
        check(without_nulls(value), spec, where, fix)
        bad = non_finite(value)
    except RecursionError:
        raise PipelineError(f"{where}: nested too deeply to be a report; {fix}") from None
    if bad:
        raise PipelineError(f"{where}: field '{bad}' should be a finite number; {fix}")
    return without_nulls(value)


def read_report(path: Path, spec) -> dict | None:
    """A JSON report checked against spec, every number finite; None when it is absent, PipelineError (one line
    naming the file and field) when it is damaged: unreadable, not UTF-8, not JSON, wrong types."""
    if not path.exists():
        return None
    try:
        value = read_artifact(path, dict, REPORT_FIX)
    except RecursionError:
        raise PipelineError(f"{path}: nested too deeply to be a report; {REPORT_FIX}") from None
    return check_report(value, spec, str(path))


def read_table(path: Path, delimiter: str = ",") -> list[tuple[int, dict]]:
    """(line number, row) of a CSV/TSV report; [] when it is absent; PipelineError when it is unreadable, not
    UTF-8 or not CSV."""
    text = read_text(path, REPORT_FIX, missing_ok=True)
    if text is None:
        return []
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        return [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise PipelineError(f"{path}: not a valid {kind} file ({exc}); {REPORT_FIX}") from None


def csv_number(row: dict, key: str, where: str, integer: bool = False):
    """row[key] as a finite number (None when empty or absent), or PipelineError naming the line and field."""
    raw = row.get(key)
    if raw is None or raw == "":
        return None
    try:
        if not isinstance(raw, str):
            raise ValueError
        value = int(raw) if integer else float(raw)
        if not _finite(value) or integer and value < 0:
            raise ValueError
    except ValueError:
        wanted = "a whole number >= 0" if integer else "a finite number"
        raise PipelineError(f"{where}: field '{key}' should be {wanted}, got {raw!r}") from None
    return value


def read_by_book(path: Path, problems: list[str]) -> list[dict]:
    """evaluate/by_book.csv's rows whose numbers are numbers; each other row is left out with a line in problems."""
    try:
        table = read_table(path)
    except PipelineError as exc:
        problems.append(str(exc))
        return []
    rows = []
    for line, row in table:
        try:
            if None in row or not isinstance(row.get("book"), str):
                raise PipelineError(f"{path}:{line}: not the header's columns")
            csv_number(row, "n", f"{path}:{line}", integer=True)
            for key in BOOK_NUMBERS:
                csv_number(row, key, f"{path}:{line}")
        except PipelineError as exc:
            problems.append(f"{exc}; row left out")
            continue
        rows.append(row)
    return rows


def read_curve(path: Path, problems: list[str] | None = None) -> list[tuple[float, float]]:
    """A DVCLive TSV (step<TAB>value) as (step, value) points; rows without two finite numbers are left out."""
    try:
        table = read_table(path, delimiter="\t")
    except PipelineError as exc:
        if problems is not None:
            problems.append(str(exc))
        return []
    points = []
    for _, row in table:
        try:
            point = (float(row["step"]), float(next(v for k, v in row.items() if k != "step" and k is not None)))
        except (KeyError, ValueError, StopIteration, TypeError):
            continue
        if all(map(math.isfinite, point)):
            points.append(point)
    return points


def optional_report(path: Path, spec, problems: list[str]) -> dict:
    """A report a run may lack ({} when absent); a damaged one is {} with a line in problems."""
    try:
        return read_report(path, spec) or {}
    except PipelineError as exc:
        problems.append(str(exc))
        return {}


def escapes(path: Path, top: Path | None) -> bool:
    """True when path exists (a link counts, even a broken one) and its real path is outside top (None: no bound)."""
    return top is not None and os.path.lexists(path) and not real_path(path).is_relative_to(top)


def load_run(name: str, folder: Path, top: Path | None = None) -> dict | None:
    """One run's figures: reports/metrics.json-style metrics, by_book.csv, training curves and summary. None when
    the folder has no metrics.json; a damaged metrics.json gives the run with its "error" (shown on the page);
    a damaged train/ or evaluate/ report is left out, with a line in "problems". With top (the real reports/runs),
    a file whose real path is outside it (a link out) is not read: an error for metrics.json, a problem for others."""
    empty = {"name": name, "group": "", "folder": str(folder), "metrics": {}, "train": {}, "summary": {},
             "by_book": [], "curves": {"train loss": [], "eval loss": []}, "bleu_signature": "", "problems": []}
    problems: list[str] = []

    def readable(path: Path) -> bool:
        if escapes(path, top):
            problems.append(f"{path}: a link out of {top}; not read")
            return False
        return True

    if not readable(folder / "metrics.json"):
        return {**empty, "error": problems[0], "problems": problems}
    try:
        metrics = read_report(folder / "metrics.json", METRICS)
    except PipelineError as exc:
        return {**empty, "error": str(exc), "problems": [str(exc)]}
    if not metrics:
        return None
    train, summary = {}, {}
    if readable(folder / "train" / "metrics.json"):
        train = optional_report(folder / "train" / "metrics.json", TRAIN_METRICS, problems)
    if readable(folder / "train" / "summary.json"):
        summary = optional_report(folder / "train" / "summary.json", SUMMARY, problems)
    curves = {}
    for curve, places in CURVES.items():
        path = next((folder / p for p in places if os.path.lexists(folder / p)), folder / places[0])
        curves[curve] = read_curve(path, problems) if readable(path) else []
    by_book = read_by_book(folder / "evaluate" / "by_book.csv", problems) if readable(
        folder / "evaluate" / "by_book.csv") else []
    signature = bleu_signature(folder, metrics, problems) if readable(folder / "evaluate" / "scores.csv") else \
        metrics.get("bleu_signature") or ""
    return {**empty, "metrics": metrics, "train": train, "summary": summary, "by_book": by_book, "curves": curves,
            "bleu_signature": signature, "problems": problems}


def bleu_signature(folder: Path, metrics: dict, problems: list[str] | None = None) -> str:
    """The model's BLEU signature: its row of evaluate/scores.csv, or, for a run from before scores.csv, the
    bleu_signature its metrics.json still had ("" when neither has one)."""
    try:
        table = read_table(folder / "evaluate" / "scores.csv")
    except PipelineError as exc:
        if problems is not None:
            problems.append(str(exc))
        table = []
    for _, row in table:
        if row.get("system") == "model" and isinstance(row.get("bleu_signature"), str) and row["bleu_signature"]:
            return row["bleu_signature"]
    return metrics.get("bleu_signature") or ""


def find_runs(runs: Path, depth: int = RUNS_DEPTH) -> list[str]:
    """The folders under runs that hold a metrics.json, as paths relative to it ('h200-pretrain-arms/C'), in
    path order (a parent before its arms): looked for up to `depth` folders deep, never through a symlinked
    folder; a run's own report folders (RUN_PARTS: train/, evaluate/, ...) are part of it, not runs."""
    found = []
    stack = [(runs, "", 0)]  # (folder, its path relative to runs, how deep)
    while stack:
        folder, rel, level = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError:  # unreadable, or gone meanwhile: nothing to list
            continue
        is_run = rel != "" and any(e.name == "metrics.json" for e in entries)
        if is_run:
            found.append(rel)
        if level >= depth:
            continue
        below = [e for e in entries if e.is_dir(follow_symlinks=False) and e.name != "metrics.json"
                 and not (is_run and e.name in RUN_PARTS)]
        stack.extend((Path(e.path), f"{rel}/{e.name}" if rel else e.name, level + 1) for e in reversed(below))
    return found


def load_runs(reports: Path) -> list[dict]:
    """The current reports/ first, then each committed run under reports/runs/, at any depth (find_runs): those
    directly under it by name, then each parent folder's arms together ('h200-pretrain-arms/A', '.../C', then
    '.../C/beam4' under h200-pretrain-arms/C)."""
    runs = []
    current = load_run("current (reports/)", reports)
    if current:
        runs.append(current)
    top = real_path(reports / "runs")
    for rel in sorted(find_runs(reports / "runs"), key=lambda rel: (rel.split("/")[:-1], rel)):
        run = load_run(rel, reports / "runs" / rel, top)
        if run:
            runs.append({**run, "group": rel.rpartition("/")[0]})  # an arm is listed under its parent folder
    return runs


# ----------------------------------------------------------------------------------------------
# DVC experiments: `dvc exp show --json` of the project, run as a command (a timeout stops a slow or stuck one;
# DVC's logging, locks and signal handlers stay out of the server)

METRICS_FILE = "reports/metrics.json"  # evaluate's metrics, as dvc.yaml declares them: an experiment's scores
EXPERIMENTS_TIMEOUT_S = 60.0  # dvc exp show: ~1 s on a small project; git or a lock held by `dvc exp run` may stall it
EXPERIMENTS_FIX = "see dvc exp show"
VALUE_CHARS = 40  # a changed param's value is cut to this many characters on the page (a system prompt is long)


def no_experiments(note: str) -> dict:
    return {"experiments": [], "note": note}


def load_experiments(root: Path, timeout: float = EXPERIMENTS_TIMEOUT_S) -> dict:
    """{"experiments": rows (experiment_rows), "note": "" or why there are none}: never an exception, so the
    page shows a note where there is no git/DVC project, no experiment, or DVC fails."""
    if not (root / ".dvc").is_dir():
        return no_experiments(f"no DVC experiments: {root} is not a DVC project (no .dvc/)")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}  # nothing leaves the machine
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    try:
        done = subprocess.run(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              encoding="utf-8", errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return no_experiments(f"no DVC experiments: dvc exp show took over {timeout:g} s and was stopped")
    except OSError as exc:
        return no_experiments(f"no DVC experiments: cannot run dvc ({exc.strerror or exc})")
    if done.returncode != 0:
        said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        why = said[-1].strip() if said else f"exit status {done.returncode}"
        return no_experiments(f"no DVC experiments: dvc exp show failed: {why}")
    try:
        entries = json.loads(done.stdout)
    except (ValueError, RecursionError):
        return no_experiments("no DVC experiments: dvc exp show --json gave no JSON")
    rows = experiment_rows(entries if isinstance(entries, list) else [])
    none = not any(r["kind"] == "experiment" for r in rows)
    return {"experiments": rows, "note": "no DVC experiments yet (dvc exp run -S KEY=VALUE runs one)" if none else ""}


def experiment_rows(entries: list) -> list[dict]:
    """`dvc exp show --json` as rows: the workspace, each baseline commit, then that commit's experiments. Each row
    has its reports/metrics.json (checked as a run's metrics are; a damaged one is its "error") and the params it
    changed against its baseline (the workspace's: against the first commit listed, HEAD)."""
    rows = []
    entries = [e for e in entries if isinstance(e, dict)]
    head = next((e for e in entries if e.get("rev") != "workspace"), None)
    for entry in entries:
        if entry.get("rev") == "workspace":
            rows.append(experiment_row(entry, "workspace", "workspace", head))
            continue
        rows.append(experiment_row(entry, entry.get("name") or str(entry.get("rev"))[:7], "baseline", None))
        for group in entry.get("experiments") or []:
            revs = group.get("revs") if isinstance(group, dict) else None
            if not revs or not isinstance(revs[0], dict):
                continue
            name = group.get("name") or revs[0].get("name") or str(revs[0].get("rev"))[:7]
            state = (group.get("executor") or {}).get("state") or ""
            rows.append(experiment_row(revs[0], name, "experiment", entry, state))
    return rows


def experiment_row(entry: dict, name: str, kind: str, baseline: dict | None, state: str = "") -> dict:
    data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
    row = {"name": str(name), "rev": "" if entry.get("rev") == "workspace" else str(entry.get("rev"))[:7],
           "kind": kind, "baseline": "" if baseline is None else str(baseline.get("name") or baseline.get("rev"))[:40],
           "state": str(state), "metrics": {}, "changed": [], "error": ""}
    where = f"{name}: {METRICS_FILE}"
    found = (data.get("metrics") or {}).get(METRICS_FILE) or {}
    error = entry.get("error") or (found.get("error") if isinstance(found, dict) else None)
    if error:
        row["error"] = f"{where}: {error.get('msg') or error.get('type') if isinstance(error, dict) else error}"
    elif isinstance(found, dict) and found.get("data") is not None:
        try:
            row["metrics"] = check_report(found["data"], METRICS, where, EXPERIMENTS_FIX)
        except PipelineError as exc:
            row["error"] = str(exc)
    if baseline is not None:
        row["changed"] = changed_params(flat_params(baseline), flat_params(entry))
    return row


def flat_params(entry: dict) -> dict[str, object]:
    """An entry's params as {'train.learning_rate': 0.0002, 'other.yaml:key': ...} (params.yaml's keys bare)."""
    out: dict[str, object] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = value

    data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
    for file, found in (data.get("params") or {}).items():
        if isinstance(found, dict) and isinstance(found.get("data"), dict):
            for k, v in found["data"].items():
                walk(v, f"{k}" if file == "params.yaml" else f"{file}:{k}")
    return out


def changed_params(before: dict, after: dict) -> list[str]:
    """'key=value' for each param after has and before has not (or otherwise), 'key (removed)' for each gone."""
    def shown(value) -> str:
        text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
        return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 1] + "…"

    def same(a, b) -> bool:
        return a == b or a != a and b != b  # NaN (a param `nan`) is itself

    out = [f"{k}={shown(v)}" for k, v in after.items() if k not in before or not same(before[k], v)]
    return out + [f"{k} (removed)" for k in before if k not in after]


# ----------------------------------------------------------------------------------------------
# SVG charts (server-side, no plotting library in the browser)

# The model, copy and base colours are the dvc plots templates' (.dvc/plots/*.json: scores_overall, scores_by_group),
# read from there, so the page and `dvc plots show` draw each system alike.
PLOT_TEMPLATE = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "scores_by_group.json"
SYSTEMS = ("model", "copy", "base")  # the templates' order (their colour domain and yOffset sort)
NO_TEMPLATE_COLOR = "#718096"  # every system, when the template cannot be read (a warning says so)


def plot_colors(template: Path) -> dict[str, str]:
    """{system: colour} of a dvc plots template: the colour scale whose domain names model, copy and base."""
    try:
        spec = json.loads(template.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{template}: cannot read it as a dvc plots template ({exc})") from None
    stack = [spec]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            scale = (value.get("color") or {}).get("scale") if isinstance(value.get("color"), dict) else None
            if isinstance(scale, dict) and isinstance(scale.get("domain"), list) and isinstance(scale.get("range"), list):
                colors = {str(k): str(v) for k, v in zip(scale["domain"], scale["range"])}
                if set(SYSTEMS) <= set(colors):
                    return {name: colors[name] for name in SYSTEMS}
            stack.extend(value.values())
    raise PipelineError(f"{template}: no colour scale with the domain {list(SYSTEMS)}")


def system_colors() -> dict[str, str]:
    try:
        return plot_colors(PLOT_TEMPLATE)
    except PipelineError as exc:
        log.warning("%s; the runs view draws model, copy and base alike", exc)
        return dict.fromkeys(SYSTEMS, NO_TEMPLATE_COLOR)


COLORS = {**system_colors(), "train loss": "#2b6cb0", "eval loss": "#c53030"}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def book_bars(rows: list[dict], width: int = 640) -> str:
    """Per book (most sentences first), BLEU of the model, copying and the base model."""
    rows = sorted(rows, key=lambda r: -int(r.get("n") or 0))[:BOOKS_SHOWN]
    if not rows:
        return "<p class='muted'>no per-book scores (evaluate/by_book.csv)</p>"
    keys = {"model": "bleu", "copy": "copy_bleu", "base": "base_bleu"}
    groups = [(f"{row.get('book')} ({row.get('n')})", {name: as_number(row.get(key)) for name, key in keys.items()})
              for row in rows]
    return grouped_bars(groups, "BLEU by book", "BLEU", width)


def as_number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def system_scores(metrics: dict, metric: str) -> dict[str, float | None]:
    """{model, copy, base: metrics.json's BLEU or chrF} (None where it has none)."""
    baselines = metrics.get("baselines") or {}
    return {"model": metrics.get(metric), **{name: (baselines.get(name) or {}).get(metric) for name in SYSTEMS[1:]}}


def grouped_bars(groups: list[tuple[str, dict]], aria: str, what: str, width: int = 640) -> str:
    """Grouped horizontal bars: per label, the value of each of SYSTEMS (model, copy, base: the order and colours
    of the dvc plots templates); a system without a value has no bar."""
    top = max([v for _, values in groups for v in values.values() if v is not None] + [1.0])
    label_w, bar_h, gap = 130, 8, 10
    group_h = bar_h * len(SYSTEMS) + gap
    height = group_h * len(groups) + 30
    scale = (width - label_w - 60) / top
    parts = [f"<svg class='chart' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='{esc(aria)}'>"]
    for k, (label, values) in enumerate(groups):
        y0 = 20 + k * group_h
        parts.append(f"<text x='{label_w - 6}' y='{y0 + bar_h * 1.8}' text-anchor='end' class='lbl'>{esc(label)}</text>")
        for j, name in enumerate(SYSTEMS):
            value = values.get(name)
            if value is None:
                continue
            y = y0 + j * bar_h
            parts.append(f"<rect x='{label_w}' y='{y}' width='{max(value * scale, 0.5):.1f}' height='{bar_h - 1}' "
                         f"fill='{COLORS[name]}'><title>{esc(label)} {name}: {what} {value:.2f}</title></rect>")
            parts.append(f"<text x='{label_w + value * scale + 4:.1f}' y='{y + bar_h - 1}' class='val'>{value:.1f}</text>")
    parts.append(legend(list(SYSTEMS), width - 210, 12))
    parts.append("</svg>")
    return "".join(parts)


def swatch(name: str) -> str:
    """A small square of a system's colour, before its column's heading."""
    return f"<i class='key' style='background:{COLORS[name]}'></i>"


def legend(names: list[str], x: int, y: int) -> str:
    out = []
    for k, name in enumerate(names):
        out.append(f"<rect x='{x + k * 70}' y='{y - 8}' width='10' height='10' fill='{COLORS[name]}'/>"
                   f"<text x='{x + k * 70 + 14}' y='{y + 1}' class='lbl'>{esc(name)}</text>")
    return "".join(out)


def loss_curves(curves: dict, width: int = 640, height: int = 220) -> str:
    """Training and eval loss against the step, on one set of axes."""
    points = [p for series in curves.values() for p in series]
    if not points:
        return "<p class='muted'>no training curves (train/plots/metrics/)</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 48, 12, 20, 28

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f"<svg class='chart' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
             f"aria-label='loss curves'>",
             f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' class='axis'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' class='axis'/>",
             f"<text x='{left - 4}' y='{top + 4}' text-anchor='end' class='val'>{y1:.2f}</text>",
             f"<text x='{left - 4}' y='{height - bottom}' text-anchor='end' class='val'>{y0:.2f}</text>",
             f"<text x='{left}' y='{height - 8}' class='val'>step {x0:g}</text>",
             f"<text x='{width - right}' y='{height - 8}' text-anchor='end' class='val'>{x1:g}</text>"]
    for name, series in curves.items():
        if not series:
            continue
        if len(series) == 1:
            x, y = series[0]
            parts.append(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{COLORS[name]}'>"
                         f"<title>{name} {y:.3f} at step {x:g}</title></circle>")
        else:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in series)
            parts.append(f"<polyline points='{path}' fill='none' stroke='{COLORS[name]}' stroke-width='1.5'/>")
    parts.append(legend([n for n in curves if curves[n]], width - 170, 12))
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# Pages

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","WenQuanYi Micro Hei",sans-serif;margin:0;
     color:#1a202c;background:#f7fafc}
header{background:#2d3748;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#e2e8f0;text-decoration:none}header a.on{color:#fff;font-weight:600;border-bottom:2px solid #90cdf4}
main{padding:16px 24px;max-width:1200px}
textarea{width:100%;min-height:140px;font-size:16px;box-sizing:border-box;padding:8px}
select,input[type=text]{font-size:14px;padding:4px;min-width:360px}
button{font-size:14px;padding:6px 14px;margin-right:6px;cursor:pointer}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #e2e8f0;padding:6px 10px;vertical-align:top}
th{background:#edf2f7;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
#aligned td.src{width:45%;color:#2d3748}#aligned td.tgt{width:55%}#aligned tr.line td{border-top:2px solid #a0aec0}
#aligned td.pending{color:#a0aec0}#aligned td.pass{color:#718096;font-style:italic}
.muted{color:#718096}.err{color:#c53030;font-weight:600}.row{margin:10px 0}
.chart text.lbl{font-size:12px}.chart text.val{font-size:10px;fill:#4a5568}.chart .axis{stroke:#718096}
td.arm{padding-left:22px}tr.group th{background:#f7fafc;font-weight:600}
.key{display:inline-block;width:10px;height:10px;margin-right:5px}td.params{font-size:12px}
.runs{display:flex;flex-wrap:wrap;gap:18px}.run{background:#fff;border:1px solid #e2e8f0;padding:10px;flex:1 1 560px}
progress{width:360px}
"""

TRANSLATE_JS = r"""
const $ = (id) => document.getElementById(id);
let output = "";
$("file").addEventListener("change", async (e) => {
  const f = e.target.files[0]; if (!f) return;
  $("text").value = await f.text(); $("filename").textContent = f.name;
});
$("model").addEventListener("change", () => { if ($("model").value) $("path").value = ""; });
function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
async function run() {
  const model = $("path").value.trim() || $("model").value;
  $("error").textContent = ""; $("aligned").innerHTML = ""; output = "";
  $("copy").disabled = true; $("download").disabled = true; $("go").disabled = true;
  $("status").textContent = "loading the model…"; $("bar").value = 0;
  try {
    const resp = await fetch("/api/translate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify({model: model, text: $("text").value})});
    if (!resp.ok) {  // refused (400, 403, 413, ...): the server says why in {"error": ...}
      let why = `${resp.status} ${resp.statusText}`;
      try { why = (await resp.json()).error || why; } catch (e) {}
      throw why;
    }
    const reader = resp.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true}); let nl;
      while ((nl = buf.indexOf("\n")) >= 0) { handle(JSON.parse(buf.slice(0, nl))); buf = buf.slice(nl + 1); }
    }
  } catch (e) { $("error").textContent = "error: " + e; $("status").textContent = ""; }
  $("go").disabled = false;
}
function handle(m) {
  if (m.event === "plan") {
    $("bar").max = Math.max(m.total, 1);
    const rows = [];
    m.lines.forEach((pieces, n) => {
      if (!pieces.length) rows.push(`<tr class="line" data-line="${n}"><td class="src"></td><td class="tgt"></td></tr>`);
      pieces.forEach((p, k) => {
        const cls = k === 0 ? "line" : "";
        const tgt = p.i === null ? `<td class="tgt pass">${esc(p.source)}</td>`
                                 : `<td class="tgt pending" id="t${p.i}">…</td>`;
        rows.push(`<tr class="${cls}" data-line="${n}"><td class="src">${esc(p.source)}</td>${tgt}</tr>`);
      });
    });
    $("aligned").innerHTML = rows.join("");
    $("status").textContent = `0 / ${m.total} sentences`;
  } else if (m.event === "piece") {
    const td = $("t" + m.i); td.textContent = m.text; td.classList.remove("pending");
    $("bar").value = m.done; $("status").textContent = `${m.done} / ${m.total} sentences`;
  } else if (m.event === "done") {
    output = m.output; $("copy").disabled = false; $("download").disabled = false;
    $("status").textContent = `done: ${m.total} sentences in ${m.seconds.toFixed(1)} s (${m.model})`;
    $("bar").value = $("bar").max;
  } else if (m.event === "error") {
    $("error").textContent = "error: " + m.message; $("status").textContent = "";
  }
}
$("go").addEventListener("click", run);
$("copy").addEventListener("click", async () => {
  try { await navigator.clipboard.writeText(output); $("status").textContent = "copied"; }
  catch (e) { const t = document.createElement("textarea"); t.value = output; document.body.appendChild(t);
              t.select(); document.execCommand("copy"); t.remove(); $("status").textContent = "copied"; }
});
$("download").addEventListener("click", () => {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([output], {type: "text/plain;charset=utf-8"}));
  const name = $("filename").textContent; a.download = name ? name.replace(/\.txt$/, "") + ".modern.txt" : "translation.txt";
  a.click(); setTimeout(() => URL.revokeObjectURL(a.href), 1000);
});
"""


def page(title: str, active: str, body: str, script: str = "") -> str:
    nav = "".join(f"<a href='{href}' class='{'on' if key == active else ''}'>{label}</a>"
                  for key, href, label in (("translate", "/", "Translate"), ("runs", "/runs", "Runs")))
    return (f"<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><link rel='icon' href='data:,'>"
            f"<style>{STYLE}</style></head><body><header><strong>wenyan-mt</strong>{nav}</header><main>{body}</main>"
            + (f"<script>{script}</script>" if script else "") + "</body></html>")


def translate_page(models: list[dict]) -> str:
    options = "".join(f"<option value='{esc(m['path'])}'>{esc(m['path'])} — {esc(m['kind'])}</option>" for m in models)
    if not options:
        options = "<option value=''>(no trained model under models/: type a path)</option>"
    body = f"""
<h2>Translate 文言文 → 现代汉语</h2>
<div class='row'><label>Model <select id='model'>{options}</select></label>
 <label>or a path <input type='text' id='path' placeholder='models/export/model-Q8_0.gguf or a model directory'></label></div>
<div class='row'><textarea id='text' placeholder='粘贴文言文，或选择一个 .txt 文件'></textarea></div>
<div class='row'><input type='file' id='file' accept='.txt,text/plain'> <span id='filename' class='muted'></span></div>
<div class='row'><button id='go'>Translate</button><button id='copy' disabled>Copy</button>
 <button id='download' disabled>Download</button> <progress id='bar' value='0' max='1'></progress>
 <span id='status' class='muted'></span> <span id='error' class='err'></span></div>
<table id='aligned'></table>
"""
    return page("wenyan-mt: translate", "translate", body, TRANSLATE_JS)


SCORE_HEAD = (f"<th>{swatch('model')}BLEU</th><th>95% CI</th><th>chrF</th><th>{swatch('copy')}copy BLEU / chrF</th>"
              f"<th>{swatch('base')}base BLEU / chrF</th><th>BLEU − copy</th>")
FIGURES_SHOWN = 6


def score_cells(m: dict) -> str:
    """The six score cells of SCORE_HEAD for a metrics.json."""
    base, copy = (m.get("baselines") or {}).get("base") or {}, (m.get("baselines") or {}).get("copy") or {}
    ci = m.get("bleu_ci95") or {}
    gain = None if m.get("bleu") is None or copy.get("bleu") is None else m["bleu"] - copy["bleu"]
    return (f"<td class='num bleu'><strong>{number(m.get('bleu'))}</strong></td>"
            f"<td class='num'>{number(ci.get('low'))}–{number(ci.get('high'))}</td><td class='num chrf'>{number(m.get('chrf'))}</td>"
            f"<td class='num'>{number(copy.get('bleu'))} / {number(copy.get('chrf'))}</td>"
            f"<td class='num'>{number(base.get('bleu'))} / {number(base.get('chrf'))}</td>"
            f"<td class='num'>{'-' if gain is None else f'{gain:+.2f}'}</td>")


def evaluated(m: dict) -> bool:
    return m.get("bleu") is not None or m.get("chrf") is not None


def figures(m: dict) -> str:
    """A metrics.json without BLEU (a pretrain run, a speed arm): its first numbers, 'loss 4.471, steps 611'."""
    found = []
    for key, value in m.items():
        inner = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in inner:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                found.append(f"{key if sub is None else f'{key}.{sub}'} {v:.4g}")
    return ", ".join(found[:FIGURES_SHOWN]) + (", …" if len(found) > FIGURES_SHOWN else "")


def runs_page(runs: list[dict], experiments: dict | None = None) -> str:
    """The runs table (the current reports/, then reports/runs/ at any depth, each arm under its parent folder),
    the DVC experiments table, and a card per run with its charts."""
    exp_part = experiments_part(experiments or no_experiments("DVC experiments are not looked up (--no-experiments)"))
    if not runs:
        return page("wenyan-mt: runs", "runs", "<p>No runs: reports/metrics.json and reports/runs/**/metrics.json "
                                               "are missing.</p>" + exp_part)
    head = f"<tr><th>run</th><th>test sentences</th>{SCORE_HEAD}<th>train steps</th><th>eval loss</th></tr>"
    rows, group = [], ""
    for run in runs:
        if run.get("group", "") != group:
            group = run.get("group", "")
            if group:
                rows.append(f"<tr class='group' data-group='{esc(group)}'><th colspan='10'>{esc(group)}/</th></tr>")
        cell = f"<td class='{'arm' if run.get('group') else 'name'}'>{esc(run['name'])}</td>"
        if run.get("error"):
            rows.append(f"<tr data-run='{esc(run['name'])}' class='damaged'>{cell}"
                        f"<td colspan='9' class='err'>damaged report: {esc(run['error'])}</td></tr>")
            continue
        m = run["metrics"]
        if not evaluated(m):
            rows.append(f"<tr data-run='{esc(run['name'])}' class='other'>{cell}<td colspan='9' class='muted'>"
                        f"no BLEU (not an evaluation): {esc(figures(m))}</td></tr>")
            continue
        rows.append(
            f"<tr data-run='{esc(run['name'])}'>{cell}<td class='num'>{esc(m.get('n_sentences', '-'))}</td>"
            f"{score_cells(m)}<td class='num'>{esc(run['train'].get('step', '-'))}</td>"
            f"<td class='num'>{number((run['train'].get('eval') or {}).get('loss'), 3)}</td></tr>")
    sig = next((r["bleu_signature"] for r in runs if r["bleu_signature"]), "")
    cards = "".join(
        f"<div class='run'><h3>{esc(run['name'])}</h3><p class='muted'>{esc(run['folder'])}</p>"
        + "".join(f"<p class='err problem'>{esc(problem)}</p>" for problem in run.get("problems", []))
        + ("" if run.get("error") or not evaluated(run["metrics"]) else
           "<h4>BLEU and chrF (model, copy, base)</h4>"
           + grouped_bars([(label, system_scores(run["metrics"], key)) for label, key in (("BLEU", "bleu"), ("chrF", "chrf"))],
                          "scores", "score")
           + f"<h4>BLEU by book (model, copy, base)</h4>{book_bars(run['by_book'])}")
        + ("" if run.get("error") else f"<h4>Loss</h4>{loss_curves(run['curves'])}")
        + "</div>" for run in runs)
    body = (f"<h2>Runs</h2><table id='runs'>{head}{''.join(rows)}</table>"
            f"<p class='muted'>sacrebleu {esc(sig)}. copy = the source sentence as its own translation; base = the untuned "
            f"model with the same prompts. From metrics.json, evaluate/scores.csv and by_book.csv and train/ of each folder; "
            f"the colours are those of dvc plots (.dvc/plots/).</p>"
            f"{exp_part}<div class='runs'>{cards}</div>")
    return page("wenyan-mt: runs", "runs", body)


def experiments_part(experiments: dict) -> str:
    """The DVC experiments table (load_experiments): the workspace, each baseline commit and its experiments with
    the params they changed, and their BLEU beside the baselines as bars; or the note saying why there are none."""
    rows_in = experiments.get("experiments") or []
    note = f"<p class='muted note'>{esc(experiments['note'])}</p>" if experiments.get("note") else ""
    if not rows_in:
        return f"<h2>DVC experiments</h2>{note}"
    head = f"<tr><th>experiment</th><th>rev</th><th>params changed (against its baseline)</th>{SCORE_HEAD}</tr>"
    rows = []
    for row in rows_in:
        name = ("└ " if row["kind"] == "experiment" else "") + row["name"] + (f" ({row['state']})" if row["state"] else "")
        changed = "<br>".join(esc(c) for c in row["changed"]) or "-"
        start = (f"<tr data-exp='{esc(row['name'])}' class='{esc(row['kind'])}{' damaged' if row['error'] else ''}'>"
                 f"<td>{esc(name)}</td><td><code>{esc(row['rev'])}</code></td><td class='params'>{changed}</td>")
        if row["error"]:
            rows.append(f"{start}<td colspan='6' class='err'>{esc(row['error'])}</td></tr>")
        else:
            rows.append(f"{start}{score_cells(row['metrics'])}</tr>")
    scored = [(row["name"], system_scores(row["metrics"], "bleu")) for row in rows_in if row["metrics"].get("bleu") is not None]
    chart = grouped_bars(scored[:BOOKS_SHOWN], "BLEU by experiment", "BLEU") if scored else ""
    return (f"<h2>DVC experiments</h2>{note}<table id='experiments'>{head}{''.join(rows)}</table>"
            f"<p class='muted'>dvc exp show: {esc(METRICS_FILE)} of each; the workspace is what reports/ holds now.</p>{chart}")


# ----------------------------------------------------------------------------------------------
# The app


def fingerprint(path: Path) -> tuple | None:
    """What a model's files are now, to notice a model changed or removed since it was loaded: the identity of
    its directory and each entry's (name, size, mtime, inode): all of a model directory's, or a GGUF's own and
    those beside it that are not another GGUF (its tokenizer, training_config.json). None when it is gone."""
    gguf_file = path.suffix == ".gguf"
    model_dir = path.parent if gguf_file else path
    try:
        if gguf_file:
            os.stat(path)
        where = os.stat(model_dir)
        entries = []
        with os.scandir(model_dir) as found:
            for entry in found:
                if gguf_file and entry.name.endswith(".gguf") and entry.name != path.name:
                    continue
                try:
                    st = entry.stat()
                    entries.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
                except OSError:  # a broken link
                    entries.append((entry.name, -1, -1, -1))
    except OSError:
        return None
    return where.st_dev, where.st_ino, tuple(sorted(entries))


class Models:
    """Translators by the model's real path, loaded once and kept while its files stay as they were (at most
    `keep`, the least recently used dropped first); one translation at a time (the CPU is the limit)."""

    def __init__(self, parallel: int, threads: int | None, keep: int = MODELS_KEPT):
        self.parallel, self.threads, self.keep = parallel, threads, keep
        self.cache: collections.OrderedDict[str, tuple[tuple, object]] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, path: Path):
        """The Translator of a model (its real path, allowed_model's); call it holding self.lock."""
        from wenyan.translation import Translator

        for key, (seen, _) in list(self.cache.items()):  # a model retrained, re-exported or deleted since
            if fingerprint(Path(key)) != seen:
                log.info("%s changed or was removed since it was loaded; dropped from memory", key)
                self.drop(key)
        key = str(path)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key][1]
        seen = fingerprint(path)  # before loading: a change while it loads shows next time
        translator = Translator(path, parallel=self.parallel, threads=self.threads)
        self.cache[key] = (seen, translator)
        while len(self.cache) > self.keep:
            self.drop(next(iter(self.cache)))
        return translator

    def drop(self, key: str) -> None:
        _, translator = self.cache.pop(key)
        model, translator.model = getattr(translator, "model", None), None
        if model is not None and callable(getattr(model, "close", None)):
            model.close()  # llama.cpp frees its memory now, not at some later collection
        del model, translator
        gc.collect()


class Cancelled(Exception):
    """A job's client went away or it ran past its time: it stops at its next sentence (or token)."""


class Job:
    """One request's translation: cancel(why) from the request's side, check() from the worker's (raises
    Cancelled once cancelled or past its deadline)."""

    def __init__(self, timeout: float):
        self.timeout, self.deadline = timeout, time.monotonic() + timeout
        self.cancelled, self.why = threading.Event(), ""

    def cancel(self, why: str) -> None:
        if not self.cancelled.is_set():
            self.why = why
            self.cancelled.set()

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            self.cancel(f"it ran past {self.timeout:g} s (--timeout)")
        if self.cancelled.is_set():
            raise Cancelled(self.why)


def run_job(models: Models, path: Path, text: str, job: Job, put) -> None:
    """One request's translation, in a worker thread: put(event) for the plan (the aligned layout), one piece per
    translated sentence as it is done, then done or error, and put(None) at the end. It waits for the model lock
    only while the job lives, and a cancelled job stops at its next sentence, or with transformers at its next
    token (a forward pre-hook), and frees the lock."""
    started, held = time.perf_counter(), False
    try:
        while not models.lock.acquire(timeout=POLL_S):
            job.check()
        held = True
        translator = models.get(path)
        plan = translator.plan(text, "text")
        k = iter(range(len(plan.pieces)))
        lines = [[{"source": p, "i": next(k) if translator_has_text(p) else None} for p in pieces]
                 for pieces in plan.planned]
        put({"event": "plan", "lines": lines, "total": len(plan.pieces)})
        done = [0]

        def on_result(i, translation):
            job.check()
            done[0] += 1
            put({"event": "piece", "i": i, "text": translation, "done": done[0], "total": len(plan.pieces)})

        job.check()
        hook = None
        if plan.pieces and translator.gguf_file is None:  # llama.cpp has no hook: it stops at the next sentence
            model = translator.load()
            if callable(getattr(model, "register_forward_pre_hook", None)):
                hook = model.register_forward_pre_hook(lambda module, args: job.check())
        try:
            out = translator.translate(plan, on_result)
        finally:
            if hook is not None:
                hook.remove()
        put({"event": "done", "output": "".join(line + "\n" for line in out), "total": len(plan.pieces),
             "seconds": time.perf_counter() - started, "model": str(path)})
    except Cancelled as exc:
        log.info("translation with %s stopped after %.1f s: %s", path, time.perf_counter() - started, exc)
        put({"event": "error", "message": f"translation stopped: {exc}"})
    except PipelineError as exc:
        put({"event": "error", "message": str(exc)})
    except Exception as exc:  # noqa: BLE001 - shown on the page, logged in full here
        log.exception("translation failed")
        put({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
    finally:
        if held:
            models.lock.release()
        put(None)


def translator_has_text(piece: str) -> bool:
    from wenyan.translation import has_text

    return has_text(piece)


# ----------------------------------------------------------------------------------------------
# What a request must be


class Refused(Exception):
    """A request the page answers with status and {"error": message} instead of a translation."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def host_port(value: str) -> tuple[str, int | None] | None:
    """'name', 'name:port', '[v6]' or '[v6]:port' as (lower-case name, port or None); None for anything else."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?", value)
    if not m or m[2] and not 0 < int(m[2]) <= 65535:
        return None
    return m[1].strip("[]").lower(), int(m[2]) if m[2] else None


def refusal(method: str, headers: list[tuple[bytes, bytes]], hosts: set[str]) -> str | None:
    """Why a request may not reach the page (None when it may): its Host must name this machine (a site whose
    name an attacker points at 127.0.0.1, DNS rebinding, sends its own); an Origin, when sent, must be this page's
    own (a foreign site's request, or 'null' from a sandbox, file: or a redirect); a cross-site POST without one
    (Sec-Fetch-Site) is refused too."""
    values: dict[str, list[str]] = {}
    for key, value in headers:
        values.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1").strip())
    given = values.get("host", [])
    host = host_port(given[0]) if len(given) == 1 else None
    if host is None or host[0] not in hosts:
        return (f"Host {given[0] if len(given) == 1 else given!r} is not this machine; open the page at "
                f"http://127.0.0.1:PORT/ or http://localhost:PORT/")
    origins = values.get("origin", [])
    if origins:
        origin = origins[0]
        own = len(origins) == 1 and origin[:7].lower() == "http://" and host_port(origin[7:])
        if not own or (own[0], own[1] or 80) != (host[0], host[1] or 80):
            return f"Origin {origin!r} is not this page's own (http://{given[0]}); another site cannot use it"
    elif method not in ("GET", "HEAD") and \
            values.get("sec-fetch-site", ["same-origin"])[0].lower() not in ("same-origin", "none"):
        return "a request from another site cannot use this page"
    return None


class LocalOnly:
    """ASGI middleware: a request refusal() names gets 403 {"error": why} and reaches no route."""

    def __init__(self, app, hosts: set[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            why = refusal(scope["method"], scope.get("headers", []), self.hosts)
            if why is not None:
                from starlette.responses import JSONResponse

                log.warning("refused %s %s: %s", scope["method"], scope.get("path"), why)
                await JSONResponse({"error": why}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request, limit: int) -> bytes:
    """The body of a JSON request, refused (Refused) before a byte is read when it is not JSON or its
    Content-Length is missing, not a number or over limit, and read no further than its Content-Length."""
    from starlette.requests import ClientDisconnect

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(400, "the request body must be JSON {model, text} (Content-Type: application/json)")
    lengths = [v for k, v in request.scope.get("headers", []) if k.lower() == b"content-length"]
    if not lengths:
        raise Refused(411, f"the request needs a Content-Length (a JSON body of at most {limit:,} bytes)")
    if len(set(lengths)) != 1 or not re.fullmatch(rb"[0-9]+", lengths[0].strip()):
        raise Refused(400, f"Content-Length must be one number of bytes; got {b', '.join(lengths).decode('latin-1')!r}")
    length = int(lengths[0])
    if length > limit:
        raise Refused(413, f"the request body is {length:,} bytes; the page takes at most {limit:,} "
                           f"(use wenyan-translate --input for a whole book)")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > length:
                raise Refused(400, f"the request body is longer than its Content-Length ({length:,} bytes)")
    except ClientDisconnect:
        raise Refused(400, "the client went away before it sent the whole body") from None
    if len(body) < length:
        raise Refused(400, f"the request body is shorter than its Content-Length ({len(body):,} of {length:,} bytes)")
    return bytes(body)


def translate_request(body: bytes) -> tuple[str, str]:
    """(model, text) of a request body, or Refused."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply
        value = None
    if not isinstance(value, dict):
        raise Refused(400, "the request body must be JSON {model, text}")
    model, text = value.get("model"), value.get("text")
    if not isinstance(model, str) or not model.strip() or not isinstance(text, str):
        raise Refused(400, "give a model path and a text")
    try:
        (model + text).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\ud800 in the JSON): no reply could carry it back
        raise Refused(400, "the model path and the text must be valid Unicode (no lone surrogates)") from None
    if len(text) > MAX_TEXT_CHARS:
        raise Refused(413, f"the text has {len(text)} characters; the page takes at most {MAX_TEXT_CHARS} "
                           f"(use wenyan-translate --input for a whole book)")
    return model.strip(), text


async def stream_job(request, models: Models, path: Path, text: str, timeout: float):
    """NDJSON lines of run_job, started here (so that it runs only while someone reads it); however the stream
    ends (done, the client gone, the server stopping) the job is cancelled, which frees the model lock."""
    job, loop, events = Job(timeout), asyncio.get_running_loop(), asyncio.Queue()
    gone = "the page was closed or its connection lost"

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the server's loop is closed: nobody reads any more
            job.cancel("the server stopped")

    threading.Thread(target=run_job, args=(models, path, text, job, put), daemon=True, name="translate").start()
    try:
        while True:
            try:
                item = await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel(gone)
                    return
                continue
            if item is None:
                return
            yield (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")
    finally:
        job.cancel(gone)  # nothing when the job is done


def make_app(root: Path, given: list[Path], parallel: int = 16, threads: int | None = None, *,
             hosts: tuple[str, ...] = (), timeout: float = JOB_TIMEOUT_S, experiments: bool = True):
    """The page's app: root is the project (models/, reports/), given the --model paths, hosts names this machine
    is reached by besides LOCAL_HOSTS (--host), timeout the seconds a translation may run, experiments whether the
    runs view lists DVC experiments (dvc exp show in root, each time it is loaded; --no-experiments)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    models = Models(parallel, threads)
    reports = root / "reports"
    allowed_hosts = {h.lower() for h in LOCAL_HOSTS} | {h.strip("[]").lower() for h in hosts if h}

    async def index(request: Request):
        return HTMLResponse(translate_page(find_models(root, given)))

    def find_experiments() -> dict:
        if not experiments:
            return no_experiments("DVC experiments are not looked up (--no-experiments)")
        return load_experiments(root)

    async def runs(request: Request):  # in threads: reading reports and dvc exp show must not stall a translation
        found, exps = await asyncio.gather(asyncio.to_thread(load_runs, reports), asyncio.to_thread(find_experiments))
        return HTMLResponse(runs_page(found, exps))

    async def api_models(request: Request):
        return JSONResponse(find_models(root, given))

    async def api_runs(request: Request):
        found = await asyncio.to_thread(load_runs, reports)
        return JSONResponse([{k: v for k, v in r.items() if k != "curves"} for r in found])

    async def api_experiments(request: Request):
        return JSONResponse(await asyncio.to_thread(find_experiments))

    async def api_translate(request: Request):
        try:
            model, text = translate_request(await read_body(request, MAX_BODY_BYTES))
            try:
                path = allowed_model(model, root, model_roots(root, given))
            except PipelineError as exc:
                raise Refused(403, str(exc)) from None
        except Refused as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return StreamingResponse(stream_job(request, models, path, text, timeout), media_type="application/x-ndjson")

    app = Starlette(routes=[Route("/", index), Route("/runs", runs), Route("/api/models", api_models),
                            Route("/api/runs", api_runs), Route("/api/experiments", api_experiments),
                            Route("/api/translate", api_translate, methods=["POST"])],
                    middleware=[Middleware(LocalOnly, hosts=allowed_hosts)])
    app.state.models = models
    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (IPv6 for a host with ':'), or PipelineError saying why not."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise PipelineError(f"cannot listen on {host} ({exc.strerror or exc}); give another --host") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:  # in use, no such address; OverflowError: a port out of 0-65535
        sock.close()
        why = "in use by another program" if getattr(exc, "errno", None) == errno.EADDRINUSE else \
            getattr(exc, "strerror", None) or str(exc)
        raise PipelineError(f"cannot listen on {host}:{port} ({why}); give another --port (0 = any free one)") from None
    return sock


def serve(app, host: str, port: int, ready=None) -> None:
    """Run uvicorn on an already bound socket, so that port 0 gives a free port and the address printed is real."""
    import uvicorn

    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{sock.getsockname()[1]}/"
    print(f"wenyan-mt page: {address}  (Ctrl+C stops it)", flush=True)
    if ready is not None:
        ready(address)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    server.run(sockets=[sock])


def parse_port(value: str) -> int:
    """--port as a number from 0 to 65535, or PipelineError (one line, not argparse's usage and traceback)."""
    if not re.fullmatch(r"[0-9]{1,5}", value.strip()) or int(value) > 65535:
        raise PipelineError(f"--port must be a whole number from 0 to 65535 (0 = any free one); got {value!r}")
    return int(value)


def parse_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise PipelineError(f"--timeout must be a number of seconds > 0; got {value!r}")
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", "-m", type=Path, action="append", default=[],
                        help="a trained model directory or exported .gguf to offer first (repeatable)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the project directory (models/, reports/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", default=str(DEFAULT_PORT), help=f"port (default {DEFAULT_PORT}; 0 = a free one)")
    parser.add_argument("--parallel", type=int, default=16, help="GGUF: sentences llama.cpp decodes at once")
    parser.add_argument("--threads", type=int, default=None, help="GGUF: CPU threads (default: all)")
    parser.add_argument("--timeout", default=str(JOB_TIMEOUT_S),
                        help=f"seconds a translation may run before it is stopped (default {JOB_TIMEOUT_S:g})")
    parser.add_argument("--no-experiments", action="store_true",
                        help="leave DVC experiments out of the runs view (it runs `dvc exp show` each time it loads)")
    args = parser.parse_args(argv)
    port, timeout = parse_port(args.port), parse_timeout(args.timeout)
    if args.parallel < 1:
        raise PipelineError(f"--parallel must be >= 1; got {args.parallel}")
    if args.threads is not None and args.threads < 1:
        raise PipelineError(f"--threads must be >= 1; got {args.threads}")
    for path in args.model:
        if not path.exists():
            raise PipelineError(f"{path}: model not found (a trained model directory or an exported .gguf)")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise PipelineError(f"the web page needs {exc.name}: pip install -e .") from None
    given = [path.absolute() for path in args.model]  # the page sends back what it lists: not relative to --root
    app = make_app(args.root.resolve(), given, args.parallel, args.threads, hosts=(args.host,), timeout=timeout,
                   experiments=not args.no_experiments)
    serve(app, args.host, port)


def cli() -> None:
    from wenyan import gguf

    gguf.quiet_openmp()
    run_main(main)


if __name__ == "__main__":
    cli()
