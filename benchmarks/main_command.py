"""Time the README's main command (`dvc repro` on the built-in corpus and model, CPU) on a fresh clone.

    python benchmarks/main_command.py                                   # HEAD as committed
    python benchmarks/main_command.py --variant none -S train.extend_vocab=none --variant auto

Installs are excluded: the clone runs with this interpreter's environment (the README's venv). Each variant is a
fresh `git clone` of HEAD with its -S overrides written into params.yaml, then `dvc repro`, timed as a whole and
per stage (from DVC's "Running stage" lines). Writes reports/benchmarks/main_command.{json,md}: wall times, the
stage times and each variant's metrics side by side.
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
sys.path.insert(0, str(REPO))


def run_variant(name: str, overrides: list[str], workdir: Path) -> dict:
    import yaml

    from benchmarks.run_stages import set_key

    clone = workdir / name
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    if overrides:
        params_path = clone / "params.yaml"
        params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
        for item in overrides:
            key, _, value = item.partition("=")
            set_key(params, key, value)
        params_path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
        subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam",
                        f"variant {name}"], cwd=clone, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    stages: dict[str, float] = {}
    current, since = None, None
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        match = re.match(r"Running stage '([^']+)'", line)
        if match:
            now = time.perf_counter()
            if current:
                stages[current] = round(now - since, 1)
            current, since = match.group(1), now
    code = proc.wait()
    total = time.perf_counter() - start
    if current:
        stages[current] = round(time.perf_counter() - since, 1)
    (workdir / f"{name}.log").write_text("".join(log), encoding="utf-8")
    result = {"variant": name, "overrides": overrides, "exit": code, "dvc_repro_s": round(total, 1), "stages_s": stages}
    if code == 0:
        metrics = json.loads((clone / "reports" / "metrics.json").read_text(encoding="utf-8"))
        summary = {**json.loads((clone / "reports" / "train" / "summary.json").read_text(encoding="utf-8")),  # + measurements:
                   **json.loads((clone / "reports" / "train" / "metrics.json").read_text(encoding="utf-8"))}
        result.update({
            "sentences": metrics["n_sentences"], "bleu": metrics["bleu"], "chrf": metrics["chrf"],
            "copy_bleu": metrics["baselines"].get("copy", {}).get("bleu"),
            "base_bleu": metrics["baselines"].get("base", {}).get("bleu"),
            "added_tokens": summary.get("added_tokens"), "mean_example_tokens": summary.get("mean_example_tokens"),
            "train_tokens_per_s": summary.get("tokens_per_s"), "final_eval_loss": summary.get("final_eval_loss"),
        })
    else:
        result["log_tail"] = "".join(log[-20:])
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", default=[], help="a name; the -S flags after it belong to it")
    parser.add_argument("-S", "--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks" / "main_command"))
    parser.add_argument("--keep", help="keep the clones and logs in this directory")
    args, _ = parser.parse_known_args(argv)
    # group -S flags under the --variant before them (argparse loses the order; read argv directly)
    tokens = list(sys.argv[1:] if argv is None else argv)
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
    variants = variants or [("default", [])]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="main-command-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = [run_variant(name, overrides, workdir) for name, overrides in variants]
    report = {"command": "python benchmarks/main_command.py " + " ".join(tokens), "commit": head,
              "cpus": os.cpu_count(), "machine": platform.machine(), "load_average_at_end": os.getloadavg(),
              "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    names = sorted({s for r in results for s in r["stages_s"]}, key=lambda s: min(
        list(r["stages_s"]).index(s) if s in r["stages_s"] else 99 for r in results))
    lines = [f"# The README's main command (`dvc repro`, fresh clone of {head}, {os.cpu_count()} CPUs, installs excluded)",
             "", f"`{report['command']}`", "",
             "| variant | dvc repro (s) | " + " | ".join(names) + " | sentences | BLEU | copy | base | added tokens |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['variant']} {' '.join(r['overrides'])} | {r['dvc_repro_s']} | "
                     + " | ".join(str(r["stages_s"].get(s, "")) for s in names)
                     + f" | {r.get('sentences', '')} | {r.get('bleu', 'failed')} | {r.get('copy_bleu', '')} | "
                       f"{r.get('base_bleu', '')} | {r.get('added_tokens', '')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
