"""Screen training variants of the CPU default by the eval loss on valid, then score chosen ones on test.

    python benchmarks/train_variants.py --work /tmp/tv --jobs 2 --threads 1 \
        --variant short -S 'format.system_prompt=你是翻译家。' \
        --variant short-lr1e-3 -S 'format.system_prompt=你是翻译家。' -S train.learning_rate=0.001
    python benchmarks/train_variants.py --work /tmp/tv --evaluate short-lr1e-3 ...   # same variants, + test BLEU

Runs from a checkout where `dvc repro split base` has run (data/split, models/base). Each variant gets
WORK/NAME/params.yaml (params.yaml + its -S overrides), its own format stage output when the format section
differs (data of the same prompt are shared), and `python -m stages.train --params ...` into WORK/NAME; up to
--jobs variants train at once, each with --threads torch threads (OMP_NUM_THREADS). A variant already trained in
WORK is not trained again. --evaluate NAME... also runs evaluate_base (once per prompt) and evaluate for those
variants on the test sample of params.yaml's evaluate section. Writes OUT.{json,md}: per variant the steps,
examples seen, tokens, eval loss on valid, train time, and BLEU/chrF/copy/base where evaluated. Times are wall
times of this machine as it was (see the load average in the report): compare variants by steps and tokens;
time the winner with benchmarks/main_command.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path, threads: int) -> tuple[float, float]:
    """Run a stage: (wall seconds, CPU seconds (user + system) of the stage process). CPU seconds depend much
    less than wall time on what else the shared cores run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"error: {' '.join(cmd[:3])} failed ({code}); see {log}")
    return round(time.perf_counter() - t0, 1), round(usage.ru_utime + usage.ru_stime, 1)


def prepare(name: str, overrides: list[str], work: Path) -> tuple[Path, Path]:
    """WORK/NAME/params.yaml and the format directory for its prompt (formatted once per format section)."""
    import yaml

    from wenyan.params import set_key

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for item in overrides:
        key, _, value = item.partition("=")
        set_key(params, key, value)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    key = hashlib.sha1(json.dumps(params["format"], sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:10]
    fmt = work / f"format-{key}"
    if not (fmt / "test.jsonl").exists():
        run([sys.executable, "-m", "stages.format", "--split-dir", "data/split", "--out", str(fmt), "--report",
             str(work / f"format-{key}.json"), "--params", str(params_path)], work / f"format-{key}.log", 1)
    return params_path, fmt


def train(name: str, params_path: Path, fmt: Path, work: Path, threads: int) -> dict:
    folder = work / name
    summary_path = folder / "reports" / "summary.json"
    if not summary_path.exists():
        wall, cpu = run([sys.executable, "-m", "stages.train", "--train", str(fmt / "train.jsonl"), "--valid",
                    str(fmt / "valid.jsonl"), "--out", str(folder / "adapter"), "--checkpoints",
                    str(folder / "checkpoints"), "--reports", str(folder / "reports"), "--params", str(params_path),
                    "--timings", str(folder / "timings.json")],
                   folder / "train.log", threads)
        (folder / "train_times.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
    # summary.json: what the run did; --timings: its measurements (train_time_s, tokens_per_s, ...)
    s = {**json.loads(summary_path.read_text(encoding="utf-8")),
         **json.loads((folder / "timings.json").read_text(encoding="utf-8"))}
    return {"steps": s["steps"], "rows_per_batch": s["rows_per_batch"], "examples_seen": s["steps"] * s["rows_per_batch"],
            "mean_example_tokens": s["mean_example_tokens"], "tokens_seen": s["tokens_seen"],
            "final_train_loss": s["final_train_loss"], "final_eval_loss": s["final_eval_loss"],
            "train_time_s": s["train_time_s"], **{f"train_stage_{k}": v for k, v in times(folder / "train_times.json").items()},
            "tokens_per_s": s["tokens_per_s"]}


def times(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def evaluate(name: str, params_path: Path, fmt: Path, work: Path, threads: int) -> dict:
    folder = work / name
    base_outputs = fmt.with_name(fmt.name + "-base_outputs.jsonl")
    if not base_outputs.exists():
        wall, cpu = run([sys.executable, "-m", "stages.evaluate_base", "--test", str(fmt / "test.jsonl"), "--base",
                         "models/base", "--out", str(base_outputs), "--params", str(params_path)],
                        work / f"{fmt.name}-base.log", threads)
        base_outputs.with_suffix(".times.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
    metrics_path = folder / "metrics.json"
    if not metrics_path.exists():
        wall, cpu = run([sys.executable, "-m", "stages.evaluate", "--test", str(fmt / "test.jsonl"), "--model", str(folder / "adapter"),
             "--metrics", str(metrics_path), "--out-dir", str(folder / "evaluate"), "--hypotheses",
             str(folder / "hypotheses.jsonl"), "--base-outputs", str(base_outputs), "--params", str(params_path)],
            folder / "evaluate.log", threads)
        (folder / "evaluate_times.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
    m = json.loads(metrics_path.read_text(encoding="utf-8"))
    return {"sentences": m["n_sentences"], "bleu": m["bleu"], "bleu_ci95": m.get("bleu_ci95"), "chrf": m["chrf"],
            "hit_max_new_tokens": m.get("hit_max_new_tokens"), "copy_bleu": m["baselines"].get("copy", {}).get("bleu"),
            "base_bleu": m["baselines"].get("base", {}).get("bleu"),
            **{f"evaluate_{k}": v for k, v in times(folder / "evaluate_times.json").items()},
            **{f"evaluate_base_{k}": v for k, v in times(base_outputs.with_suffix(".times.json")).items()}}


def pair(row: dict, stage: str) -> str:
    return f"{row[stage + '_wall_s']} / {row[stage + '_cpu_s']}" if stage + "_wall_s" in row else ""


def main(argv=None) -> None:
    from benchmarks.main_command import parse_variants

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], help="a name; the -S flags after it belong to it")
    parser.add_argument("-S", "--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--work", required=True, help="folder for the variants' params, models and logs")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads a variant (OMP_NUM_THREADS)")
    parser.add_argument("--evaluate", nargs="*", default=[], help="variants to score on the test sample too")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "train_variants"))
    args, _ = parser.parse_known_args(argv)
    tokens = list(sys.argv[1:] if argv is None else argv)
    variants = parse_variants(tokens)  # the names after --evaluate are skipped there as unknown tokens
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepared = {name: (overrides, *prepare(name, overrides, work)) for name, overrides in variants}
    with ThreadPoolExecutor(args.jobs) as pool:
        trained = dict(zip(prepared, pool.map(lambda n: train(n, prepared[n][1], prepared[n][2], work, args.threads),
                                              prepared)))
    results = []
    for name, (overrides, params_path, fmt) in prepared.items():
        row = {"variant": name, "overrides": overrides, **trained[name]}
        if name in args.evaluate:
            row.update(evaluate(name, params_path, fmt, work, args.threads))
        results.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {"command": "python benchmarks/train_variants.py " + " ".join(tokens), "commit": head,
              "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    header = ["variant", "steps", "examples seen", "mean example tokens", "tokens seen", "train loss", "eval loss (valid)",
              "train steps (s)", "train stage wall / CPU (s)", "evaluate_base wall / CPU (s)", "evaluate wall / CPU (s)", "BLEU", "95% CI", "chrF", "copy", "base", "hit max tokens"]
    lines = [f"# Training variants of the CPU default (commit {head}, {os.cpu_count()} CPUs, {args.threads} thread(s) "
             f"a variant, {args.jobs} at once)", "", f"`{report['command']}`", "",
             f"Load average at the end: {', '.join(f'{x:.2f}' for x in report['load_average_at_end'])}: times are "
             "this shared machine's, compare variants by steps and tokens.", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for r in results:
        ci = r.get("bleu_ci95") or {}
        lines.append("| " + " | ".join(str(x) for x in [
            f"{r['variant']} {' '.join(r['overrides'])}".strip(), r["steps"], r["examples_seen"], r["mean_example_tokens"],
            r["tokens_seen"], f"{r['final_train_loss']:.3f}", f"{r['final_eval_loss']:.3f}", r["train_time_s"],
            pair(r, "train_stage"), pair(r, "evaluate_base"), pair(r, "evaluate"), r.get("bleu", ""), f"{ci.get('low')}–{ci.get('high')}" if ci else "", r.get("chrf", ""),
            r.get("copy_bleu", ""), r.get("base_bleu", ""), r.get("hit_max_new_tokens", "")]) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
