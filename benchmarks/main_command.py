"""Time the README's main command (`dvc repro` on the built-in corpus and model, CPU) on a fresh clone.

    python benchmarks/main_command.py                                   # HEAD as committed
    python benchmarks/main_command.py --variant none -S train.extend_vocab=none --variant auto
    python benchmarks/main_command.py --one-clone --keep /tmp/mc --out reports/benchmarks/main_command_cpu_tuning \
        --variant default --variant short -S 'format.system_prompt=你是翻译家。' \
        --variant short-lr1e-3 -S 'format.system_prompt=你是翻译家。' -S train.learning_rate=0.001

Installs are excluded: the clone runs with this interpreter's environment (the README's venv). Each variant is a
fresh `git clone` of HEAD with its -S overrides written into params.yaml, then `dvc repro`, timed as a whole and
per stage (from DVC's "Running stage" lines). With --one-clone the variants run one after another in ONE clone
(params.yaml = HEAD's + the variant's overrides, then `dvc repro`): stages whose deps and params did not change
are skipped or restored from DVC's run cache, as in `dvc exp run`, so a train-only variant costs train + evaluate.
Its "fresh total" column then adds, for each skipped stage, the time that stage took when it last ran in this
clone: an estimate of a fresh clone's `dvc repro`, not a measurement (the first variant's is measured).
Writes OUT.{json,md} (default reports/benchmarks/main_command): wall times, the stage times and each variant's
metrics (BLEU, chrF, copy, base, eval loss on valid, steps, examples seen) side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_overrides(clone: Path, base_params: str, overrides: list[str]) -> None:
    import yaml

    from wenyan.params import set_key

    params = yaml.safe_load(base_params)
    for item in overrides:
        key, _, value = item.partition("=")
        set_key(params, key, value)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


def timed_repro(clone: Path, log_path: Path) -> tuple[int, float, dict, list[str], list[str]]:
    """`dvc repro` in `clone`: (exit code, seconds, {stage: seconds} of the stages that ran, stages skipped or
    restored from the run cache, the log lines)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    stages: dict[str, float] = {}
    skipped: list[str] = []
    current, since = None, None
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        running = re.match(r"Running stage '([^']+)'", line)
        cached = re.match(r"Stage '([^']+)' (didn't change|is cached)", line)
        if running or cached:
            now = time.perf_counter()
            if current:
                stages[current] = round(now - since, 1)
            current, since = (running.group(1), now) if running else (None, None)
            if cached:
                skipped.append(cached.group(1))
    code = proc.wait()
    total = time.perf_counter() - start
    if current:
        stages[current] = round(time.perf_counter() - since, 1)
    log_path.write_text("".join(log), encoding="utf-8")
    return code, total, stages, skipped, log


def variant_metrics(clone: Path) -> dict:
    metrics = json.loads((clone / "reports" / "metrics.json").read_text(encoding="utf-8"))
    summary = {**json.loads((clone / "reports" / "train" / "summary.json").read_text(encoding="utf-8")),  # + measurements:
               **json.loads((clone / "reports" / "timings" / "train.json").read_text(encoding="utf-8"))}
    return {
        "sentences": metrics["n_sentences"], "bleu": metrics["bleu"], "bleu_ci95": metrics.get("bleu_ci95"),
        "chrf": metrics["chrf"], "hit_max_new_tokens": metrics.get("hit_max_new_tokens"),
        "copy_bleu": metrics["baselines"].get("copy", {}).get("bleu"),
        "base_bleu": metrics["baselines"].get("base", {}).get("bleu"),
        "added_tokens": summary.get("added_tokens"), "mean_example_tokens": summary.get("mean_example_tokens"),
        "steps": summary.get("steps"), "rows_per_batch": summary.get("rows_per_batch"),
        "examples_seen": (summary.get("steps") or 0) * (summary.get("rows_per_batch") or 0),
        "tokens_seen": summary.get("tokens_seen"), "train_time_s": summary.get("train_time_s"),
        "train_tokens_per_s": summary.get("tokens_per_s"), "final_eval_loss": summary.get("final_eval_loss"),
        "final_train_loss": summary.get("final_train_loss"),
    }


def run_variant(name: str, overrides: list[str], workdir: Path, clone: Path | None = None,
                last_times: dict | None = None) -> dict:
    """One variant: a fresh clone (clone None) or the shared clone of --one-clone (`last_times`: each stage's time
    when it last ran there, for the fresh-total estimate)."""
    fresh = clone is None
    if fresh:
        clone = workdir / name
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    base_params = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=clone, capture_output=True, text=True,
                                 check=True).stdout
    if overrides or not fresh:
        write_overrides(clone, base_params, overrides)
    if overrides and fresh:
        subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam",
                        f"variant {name}"], cwd=clone, check=True)
    code, total, stages, skipped, log = timed_repro(clone, workdir / f"{name}.log")
    result = {"variant": name, "overrides": overrides, "exit": code, "dvc_repro_s": round(total, 1),
              "stages_s": stages, "skipped": skipped}
    if last_times is not None:
        last_times.update(stages)
        missing = [s for s in skipped if s not in last_times]
        result["fresh_total_s"] = None if missing else round(total + sum(last_times[s] for s in skipped), 1)
    if code == 0:
        result.update(variant_metrics(clone))
    else:
        result["log_tail"] = "".join(log[-20:])
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return result


def parse_variants(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """Group the -S flags under the --variant before them (argparse loses the order; read argv directly)."""
    variants: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(tokens):
        if tokens[i] == "--variant":
            variants.append((tokens[i + 1], []))
            i += 2
        elif tokens[i] in ("-S", "--set"):
            if not variants:
                variants.append(("default", []))
            variants[-1][1].append(tokens[i + 1])
            i += 2
        else:
            i += 2 if tokens[i] in ("--out", "--keep") else 1
    return variants or [("default", [])]


def fmt(value, digits=None) -> str:
    if value is None or value == "":
        return ""
    return f"{value:.{digits}f}" if digits is not None and isinstance(value, float) else str(value)


def markdown(report: dict, one_clone: bool) -> str:
    results = report["results"]
    names = sorted({s for r in results for s in list(r["stages_s"]) + r.get("skipped", [])}, key=lambda s: min(
        (list(r["stages_s"]) + r.get("skipped", [])).index(s) if s in list(r["stages_s"]) + r.get("skipped", [])
        else 99 for r in results))
    where = "variants in one clone, unchanged stages skipped (`--one-clone`)" if one_clone else "a fresh clone each"
    lines = [f"# The README's main command (`dvc repro`, {where}, of {report['commit']}, {report['cpus']} CPUs, "
             "installs excluded)", "", f"`{report['command']}`", "",
             f"Load average at the end: {', '.join(f'{x:.2f}' for x in report['load_average_at_end'])} "
             "(the cores are shared: stage times are noisy)."]
    if one_clone:
        lines += ["", "A stage marked `-` was skipped (unchanged, or restored from the run cache). *fresh total* adds "
                  "to the measured `dvc repro` the time each skipped stage took when it last ran in this clone: an "
                  "estimate of a fresh clone's run; the first variant's is measured."]
    header = ["variant", "dvc repro (s)"] + (["fresh total (s)"] if one_clone else []) + names + [
        "steps", "examples seen", "mean example tokens", "train tokens/s", "eval loss (valid)", "sentences", "BLEU",
        "chrF", "copy", "base", "hit max tokens", "added tokens"]
    lines += ["", "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in results:
        cells = [f"{r['variant']} {' '.join(r['overrides'])}".strip(), fmt(r["dvc_repro_s"])]
        if one_clone:
            cells.append(fmt(r.get("fresh_total_s")))
        cells += [fmt(r["stages_s"][s]) if s in r["stages_s"] else ("-" if s in r.get("skipped", []) else "")
                  for s in names]
        cells += [fmt(r.get("steps")), fmt(r.get("examples_seen")), fmt(r.get("mean_example_tokens")),
                  fmt(r.get("train_tokens_per_s")), fmt(r.get("final_eval_loss"), 3), fmt(r.get("sentences")),
                  fmt(r.get("bleu", "failed")), fmt(r.get("chrf")), fmt(r.get("copy_bleu")), fmt(r.get("base_bleu")),
                  fmt(r.get("hit_max_new_tokens")), fmt(r.get("added_tokens"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], help="a name; the -S flags after it belong to it")
    parser.add_argument("-S", "--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--one-clone", action="store_true",
                        help="run the variants one after another in one clone, skipping unchanged stages")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "main_command"),
                        help="report path without suffix (.json and .md are written)")
    parser.add_argument("--keep", help="keep the clones and logs in this directory")
    args, _ = parser.parse_known_args(argv)
    tokens = list(sys.argv[1:] if argv is None else argv)
    variants = parse_variants(tokens)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="main-command-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    report = {"command": "python benchmarks/main_command.py " + " ".join(tokens), "commit": head,
              "cpus": os.cpu_count(), "machine": platform.machine(), "one_clone": args.one_clone, "results": []}
    clone, last_times = None, None
    if args.one_clone:
        clone, last_times = workdir / "clone", {}
        if not clone.exists():
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    for name, overrides in variants:
        report["results"].append(run_variant(name, overrides, workdir, clone, last_times))
        report["load_average_at_end"] = os.getloadavg()
        # written after every variant: a long series that is stopped keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(report, args.one_clone), encoding="utf-8")


if __name__ == "__main__":
    main()
