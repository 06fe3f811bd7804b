"""Peak memory (max RSS) and time of the train stage as `dvc repro` runs it, on a checkout of the project.

    python benchmarks/train_memory.py --repo /tmp/clone --label after               # -> reports/benchmarks/train_memory.*
    python benchmarks/train_memory.py --repo /tmp/old-clone --label before --out reports/benchmarks/train_memory

--repo is a checkout (a `git clone`) whose data/format and models/base this script brings up to date first
(`dvc repro format base`, not measured); then it runs the train stage's command exactly as dvc.yaml writes it,
in that checkout and with its params.yaml, as a child process, and reads the child's peak resident memory from
the kernel (getrusage RUSAGE_CHILDREN: the largest max RSS of the waited-for processes, the stage's forked
tokenizing workers included). The checkout's models/adapter and reports/train are overwritten: use a clone.
Each --label is one row of the report; running again with another label adds a row, the same label replaces it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_command(repo: Path) -> str:
    import yaml

    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return stages["train"]["cmd"]


def measure(repo: Path) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(repo)}  # the checkout's own code, whatever is installed
    subprocess.run([sys.executable, "-m", "dvc", "repro", "format", "base"], cwd=repo, env=env, check=True)
    cmd = train_command(repo)
    # --params: read the checkout's params.yaml directly (as the stage does under DVC, without DVC's lock on it)
    started = time.perf_counter()
    proc = subprocess.run(f"{cmd} --params params.yaml", shell=True, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    summary = json.loads((repo / "reports/train/summary.json").read_text(encoding="utf-8"))
    data = summary.get("train_data", {})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    return {
        "commit": commit, "command": cmd, "peak_rss_mib": round(peak_kib / 1024, 1), "wall_s": round(wall, 1),
        "rows_tokenized": data.get("rows"), "examples": data.get("examples"), "steps": summary.get("steps"),
        "rows_per_batch": summary.get("rows_per_batch"), "final_train_loss": summary.get("final_train_loss"),
        "final_eval_loss": summary.get("final_eval_loss"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", required=True, type=Path, help="a clone of the project (its outputs get overwritten)")
    parser.add_argument("--label", required=True, help="the row's name, e.g. before / after")
    parser.add_argument("--out", type=Path, default=REPO / "reports/benchmarks/train_memory",
                        help="report path without suffix (.json and .md are written)")
    args = parser.parse_args(argv)
    row = {"label": args.label, **measure(args.repo.resolve())}
    print(json.dumps(row, ensure_ascii=False), flush=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    report = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {"rows": []}
    report["rows"] = [r for r in report["rows"] if r["label"] != args.label] + [row]
    report.update(cpus=os.cpu_count(), machine=platform.machine(),
                  command="python benchmarks/train_memory.py --repo CLONE --label LABEL")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    lines = ["# Train stage (CPU default): peak memory and time", "",
             f"`{report['command']}` on a clone of each commit ({report['cpus']} CPUs, shared); peak = max RSS of the "
             "stage's processes (getrusage RUSAGE_CHILDREN).", "",
             "| label | commit | peak RSS (MiB) | wall (s) | rows tokenised | steps | rows a batch | final train loss | final eval loss |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        lines.append(f"| {r['label']} | {r['commit']} | {r['peak_rss_mib']} | {r['wall_s']} | {r['rows_tokenized']} | "
                     f"{r['steps']} | {r['rows_per_batch']} | {r['final_train_loss']} | {r['final_eval_loss']} |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
