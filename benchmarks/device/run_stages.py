"""Run pipeline stages exactly as dvc.yaml declares them, with `-S key=value` overrides, where DVC
itself cannot run (a GPU machine holding a copy of the working tree but no git history).

    python benchmarks/device/run_stages.py -S train.backend=unsloth -S ingest.sources.classical-modern.path=/data/cm.tar.xz \
        ingest clean split format base train evaluate_base evaluate
    python benchmarks/device/run_stages.py -S pretrain.enabled=true -S pretrain.sources.classical-mono-a.path=/data/mono-a.tar.xz \
        -S pretrain.sources.classical-mono-b.path=/data/mono-b.tar.xz pretrain train       (after base; `pretrain` as in dvc.yaml)

A new name adds a source (`-S pretrain.sources.more.path=x`: a third source, with the stage's defaults for its
other keys).

Writes the resolved parameters to params.run.yaml (beside params.yaml, or --params-out) and passes
`--params params.run.yaml` to each stage's command, so the run is what `dvc exp run -S ...` would run.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from wenyan.params import set_key


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="+")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--profile", help="a profile of profiles/ (e.g. gpu), applied before the -S overrides")
    parser.add_argument("--params-out", default="params.run.yaml")
    args = parser.parse_args(argv)

    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    if args.profile:
        from tools.profile import read_profile

        for key, value in read_profile(args.profile).items():
            set_key(params, key, yaml.safe_dump(value, allow_unicode=True))
    for item in args.set:
        key, _, value = item.partition("=")
        set_key(params, key, value)
    Path(args.params_out).write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    pipeline = yaml.safe_load(Path("dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in args.stages:
        cmd = shlex.split(pipeline[stage]["cmd"])
        if cmd[0] == "python":
            cmd[0] = sys.executable
        cmd += ["--params", args.params_out]
        print(f"==> {stage}: {' '.join(cmd)}", flush=True)
        start = time.time()
        result = subprocess.run(cmd)
        print(f"==> {stage}: exit {result.returncode} after {time.time() - start:.1f} s", flush=True)
        if result.returncode != 0:
            raise SystemExit(result.returncode)


if __name__ == "__main__":
    main()
