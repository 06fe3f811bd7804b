"""check_params: every stage's parameters checked before any stage runs (the first stage of dvc.yaml).

    python -m stages.check_params --out data/checked_params.json     (what `dvc repro` runs; tests add --params FILE)

DVC deletes a stage's outputs just before it runs the stage's command, so a bad value (`dvc exp run -S
train.learning_rate=1e-4x`) used to cost models/adapter and reports/train before train said what was wrong.
This stage declares every params section and runs first (ingest and base depend on its output, every other stage
on theirs), so DVC runs it before any stage whose params changed, and stops at its error, before it deletes
anything else. It runs each stage of dvc.yaml as DVC would, with `--check-params --params FILE` added: the stage
reads and checks its parameters exactly as in a real run (types, ranges, names, templates, paths, transformers'
optimizer and scheduler names) and exits before reading any input; two at a time, a few seconds in all.
Checks that need the inputs (a model's module names for train.target_modules, the books of the corpus) stay in
the stages themselves. Before the stages, the values this machine cannot run (wenyan.params.machine_problems:
train.method qlora or load_in_4bit, a bitsandbytes optim, backend unsloth without CUDA; a num_gpus above the visible
GPUs) are refused, each in one line naming the key and what to set: they would otherwise fail late, after DVC (and
train, of its checkpoints) deleted the outputs.

Its output holds only the names of the stages checked: the same for any valid params, so a params change
reruns the stages that read them and no other. Its code deps are its own (the rule of tests/test_layout.py);
a stage's changed checks take effect in that stage at once, and here at the next params change.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wenyan.errors import PipelineError, get_logger, run_main
from wenyan.files import write_json
from wenyan.params import check_machine, read_yaml_file

log = get_logger("check_params")
SELF = "check_params"


def stage_commands(pipeline: Path) -> dict[str, list[str]]:
    """{stage: argv} for the `python -m stages.X ...` stages of dvc.yaml, but this one."""
    spec = read_yaml_file(pipeline, "pipeline file") or {}
    out = {}
    for name, stage in (spec.get("stages") or {}).items():
        cmd = stage.get("cmd") if isinstance(stage, dict) else None
        argv = shlex.split(cmd) if isinstance(cmd, str) else []
        if name != SELF and argv[:2] in (["python", "-m"], ["python3", "-m"]) and argv[2].startswith("stages."):
            out[name] = [sys.executable, *argv[1:]]
    return out


def check_stage(name: str, argv: list[str], params: Path) -> str | None:
    """None when the stage accepts the parameters, else its error line."""
    done = subprocess.run([*argv, "--check-params", "--params", str(params)], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    return f"stage {name}: {(errors or lines or ['exit ' + str(done.returncode)])[-1]}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="data/checked_params.json")
    parser.add_argument("--pipeline", type=Path, default=Path("dvc.yaml"), help="the dvc.yaml whose stages to check")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file the stages read")
    args = parser.parse_args(argv)
    params = read_yaml_file(args.params, "parameters file")
    check_machine(params if isinstance(params, dict) else {})  # the stages' own checks name a malformed file
    commands = stage_commands(args.pipeline)
    if not commands:
        raise PipelineError(f"{args.pipeline}: no `python -m stages.X` stage to check")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(commands, pool.map(lambda item: check_stage(*item, args.params), commands.items())))
    failed = [message for message in results.values() if message]
    if failed:
        raise PipelineError("; ".join(failed))
    write_json(args.out, {"checked": sorted(commands), "params": str(args.params)})
    log.info("parameters of %d stages checked: %s", len(commands), ", ".join(commands))


if __name__ == "__main__":
    run_main(main)
