"""Benchmark the data stages (ingest -> clean -> split -> format) on the full corpus archive.

Runs each stage as its own process, as `dvc repro` does, on a temporary params.yaml whose ingest
source is the archive (read straight from the .tar.xz) and whose other sections are the project's,
with outputs in a temporary directory. Records wall time per stage and in total, peak RSS (per stage
from wait4, the largest is the run's peak since the stages run one after another), pair counts, and
the machine, to reports/benchmarks/data_pipeline.json.

Run:  .venv/bin/python benchmarks/data_pipeline.py [--archive /work/shared/corpora/classical-modern.tar.xz]
Target (from the issue): <= 60 s wall and < 4 GiB peak RSS on a 2-core machine for 585,678 pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from wenyan.files import write_json
DEFAULT_ARCHIVE = "/work/shared/corpora/classical-modern.tar.xz"
TARGET_WALL_S = 60.0
TARGET_PEAK_RSS_GIB = 4.0


def stage_commands(work: Path, params: Path) -> dict[str, list[str]]:
    """The commands of dvc.yaml, with paths under `work` and an explicit --params file."""
    py = [sys.executable, "-m"]
    p = ["--params", str(params)]
    return {
        "ingest": py + ["stages.ingest", "--out", f"{work}/data/ingest/pairs.parquet", "--report", f"{work}/reports/ingest.json"] + p,
        "clean": py + ["stages.clean", "--pairs", f"{work}/data/ingest/pairs.parquet", "--out", f"{work}/data/clean/pairs.parquet", "--report", f"{work}/reports/clean.json"] + p,
        "split": py + ["stages.split", "--pairs", f"{work}/data/clean/pairs.parquet", "--out", f"{work}/data/split", "--report", f"{work}/reports/split.json"] + p,
        "format": py + ["stages.format", "--split-dir", f"{work}/data/split", "--out", f"{work}/data/format", "--report", f"{work}/reports/format.json"] + p,
    }


def run_stage(cmd: list[str]) -> dict:
    """Run one stage; wall seconds, CPU seconds and peak RSS of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({proc.returncode}): {shlex.join(cmd)}")
    return {
        "wall_s": round(wall, 2),
        "cpu_user_s": round(usage.ru_utime, 2),
        "cpu_sys_s": round(usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    import opencc
    import pandas
    import pyarrow

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {"pandas": pandas.__version__, "pyarrow": pyarrow.__version__, "opencc": opencc.__version__},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", default=DEFAULT_ARCHIVE, help="corpus archive or directory (niutrans layout)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="clean/split/format params come from here")
    parser.add_argument("--report", default=str(REPO / "reports/benchmarks/data_pipeline.json"))
    parser.add_argument("--keep", default=None, help="directory to keep the outputs in (default: a temp dir, removed)")
    args = parser.parse_args(argv)

    base = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))
    params = {k: base[k] for k in ("ingest", "clean", "split", "format")}
    params["ingest"] = {**params["ingest"], "sources": [{"path": args.archive, "format": "niutrans"}]}

    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
        stages = {}
        start = time.perf_counter()
        for name, cmd in stage_commands(work, params_file).items():
            print(f"--- {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
            stages[name] = run_stage(cmd)
            print(f"--- {name}: {stages[name]}", file=sys.stderr, flush=True)
        total = time.perf_counter() - start
        reports = {name: json.loads((work / "reports" / f"{name}.json").read_text(encoding="utf-8")) for name in stages}
        sizes = {
            str(p.relative_to(work)): round(p.stat().st_size / 2**20, 1)
            for p in sorted((work / "data").rglob("*"))
            if p.is_file()
        }

    peak_mib = max(s["peak_rss_mib"] for s in stages.values())
    result = {
        "what": "ingest -> clean -> split -> format on the full NiuTrans Classical-Modern archive, each stage a process",
        "command": shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable,
                               os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
        "archive": args.archive,
        "archive_mib": round(Path(args.archive).stat().st_size / 2**20, 1) if Path(args.archive).is_file() else None,
        "total_wall_s": round(total, 2),
        "peak_rss_mib": peak_mib,
        "peak_rss_children_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),  # cross-check
        "target": {"wall_s": TARGET_WALL_S, "peak_rss_gib": TARGET_PEAK_RSS_GIB},
        "meets_target": total <= TARGET_WALL_S and peak_mib / 1024 < TARGET_PEAK_RSS_GIB,
        "stages": stages,
        "pairs": {
            "ingest": reports["ingest"]["pairs"],
            "clean": reports["clean"]["pairs_kept"],
            "clean_dropped": reports["clean"]["dropped"],
            "split": {s: r["pairs"] for s, r in reports["split"]["splits"].items()},
            "split_leakage_dropped": reports["split"]["leakage_dropped"],
            "format": reports["format"]["rows"],
        },
        "books": reports["ingest"]["books"],
        "output_mib": sizes,
        "machine": machine(),
        "params": {k: v for k, v in params.items() if k != "ingest"},
    }
    write_json(args.report, result)
    per_stage = ", ".join(f"{k} {v['wall_s']} s" for k, v in stages.items())
    print(
        f"total {total:.1f} s ({per_stage}); "
        f"peak RSS {peak_mib:,.0f} MiB; {result['pairs']['ingest']:,} pairs in, {result['pairs']['clean']:,} after clean; "
        f"{'meets' if result['meets_target'] else 'MISSES'} the target; wrote {args.report}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
