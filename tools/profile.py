"""Named parameter profiles: a run on other hardware with one short command instead of fifteen `-S` flags.

    python -m tools.profile gpu                      # = dvc exp run -n gpu -S key=value ... (profiles/gpu.yaml)
    python -m tools.profile gpu -S train.epochs=3    # more overrides after the profile's own
    python -m tools.profile gpu --print              # show the dvc command, run nothing

A profile is `profiles/<name>.yaml`: a flat mapping of params.yaml keys (dotted, list items by index, as
`dvc exp run -S` takes them) to values. The run is an ordinary DVC experiment: `dvc exp show` lists it,
`dvc exp apply` / `dvc exp branch` keep it, and params.yaml stays the one place that holds every value.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from wenyan.errors import PipelineError, run_main
from wenyan.params import read_yaml_file

PROFILES = Path("profiles")
PARAMS_KEY = re.compile(r"\w[\w-]*(\.\w[\w-]*)*")  # train.epochs, ingest.sources.classical-modern.path


def read_profile(name: str, root: Path = PROFILES) -> dict:
    """The profile's {dotted key: value}; a name or a path to a .yaml file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else root / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in root.glob("*.yaml")) if root.is_dir() else []
        raise PipelineError(f"{path}: no such profile (profiles here: {', '.join(known) or 'none'})")
    profile = read_yaml_file(path, "profile")
    if not isinstance(profile, dict) or not profile:
        raise PipelineError(f"{path}: a profile is a mapping of params keys (e.g. train.epochs: 2) to values")
    for key, value in profile.items():
        if not isinstance(key, str) or not PARAMS_KEY.fullmatch(key):
            raise PipelineError(f"{path}: {key!r} is not a params key such as train.epochs")
        if isinstance(value, str) and "\n" in value:  # DVC's -S (Hydra grammar) keeps \n as two characters
            raise PipelineError(f"{path}: {key}: a value with a line break cannot pass through `dvc exp run -S`; "
                                "put it in params.yaml instead")
    return profile


def override(key: str, value) -> str:
    """One `-S key=value` in DVC's (Hydra's) override grammar: strings quoted, lists and numbers as JSON."""
    if isinstance(value, str):
        return f"{key}={json.dumps(value, ensure_ascii=False)}"
    if value is None:
        return f"{key}=null"
    return f"{key}={json.dumps(value, ensure_ascii=False)}"


def command(name: str, profile: dict, extra: list[str]) -> list[str]:
    flags = [arg for key, value in profile.items() for arg in ("-S", override(key, value))]
    for item in extra:
        flags += ["-S", item]
    return ["dvc", "exp", "run", "-n", Path(name).stem, *flags]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="a profile in profiles/ (e.g. gpu) or a path to one")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
    parser.add_argument("--print", action="store_true", help="print the dvc command instead of running it")
    args = parser.parse_args(argv)
    cmd = command(args.name, read_profile(args.name), args.set)
    if args.print:
        import shlex

        print(shlex.join(cmd))
        return
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    raise SystemExit(subprocess.run(cmd, env=os.environ).returncode)


if __name__ == "__main__":
    run_main(main)
