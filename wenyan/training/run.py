"""One training run, the same for train and pretrain (training_run): a staging directory beside the reports ->
dvclive logging into it -> the stage's trainer -> trainer.train -> the stage's save -> the stage's summary ->
summary.json and metrics.json (the stage's headline) replace the reports whole -> the measurements into --timings.

The stage passes what differs as functions: how to build its trainer (given the dvclive callback), how to save
what it trained, what its summary and headline metrics hold. Everything else (the staging and swapping of the
reports, a full disk while training as one error, DDP's rank 0 writing, the timings file) is here, once.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import time
from pathlib import Path

from wenyan.distributed import world
from wenyan.errors import PipelineError
from wenyan.files import disk_full, new_staging_dir, staged_dir, write_json
from wenyan.training.callbacks import make_live_callback, open_live

REPORTS_SIGNATURE = "summary.json"  # what marks --reports as a training stage's own


def training_run(stage: str, reports: Path, make_trainer, *, save, summarize, headline, measurements, timings=None,
                 resume_from=None, evaluate_at_end: bool = False, kept=(), extra_reports=None) -> dict:
    """Run one training and write its reports; returns the summary (with the logged history, which no file holds).

    make_trainer(live_callback) -> the trainer (build_trainer with that callback among its own);
    save(trainer, run) is called in every process (a sharded model is gathered by all, rank 0 writes);
    summarize(trainer, run) -> summary.json's content plus `measurements` (those go to --timings only);
    headline(summary, live) -> metrics.json (live: dvclive's last values); extra_reports: {file name: content}.
    A run that fails before the reports are in place leaves the last good ones as they were, and no staging
    directory behind."""
    rank0 = world()[0] == 0
    staging = new_staging_dir(reports) if rank0 else None  # dvclive writes as training goes: here until the end
    try:
        live = open_live(staging)
        trainer_ref = {}
        live_callback = make_live_callback(live, trainer_ref)
        trainer = trainer_ref["trainer"] = make_trainer(live_callback)
        run = run_training(trainer, live_callback, resume_from, evaluate_at_end, plots=staging, kept=kept)
        save(trainer, run)
        summary = summarize(trainer, run)
        live.end()
        if rank0:
            write_reports(staging, reports, stage, summary, headline, measurements, extra_reports or {})
            write_timings(timings, summary, measurements, live_callback.history)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["history"] = live_callback.history  # returned (benchmarks, tests), not written: dvclive has the plots
    return summary


def run_training(trainer, live_callback, resume_from, evaluate_at_end: bool, *, plots=None, kept=()) -> dict:
    """trainer.train(), then an eval at the final step if the last periodic one was earlier; the times and
    losses the summary reports. A full disk meanwhile (a checkpoint, dvclive's plots in `plots`) is one error
    naming the checkpoints and saying the `kept` outputs are as they were, not a traceback."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
        trainer_time = time.perf_counter() - t0
        evals = [h for h in live_callback.history if "eval_loss" in h]
        if evaluate_at_end and not (evals and evals[-1]["step"] == trainer.state.global_step):
            trainer.evaluate()  # logged at the final step by the callback
            evals = [h for h in live_callback.history if "eval_loss" in h]
    except Exception as exc:
        if not disk_full(exc):
            raise
        raise PipelineError(f"{trainer.args.output_dir}: no space left on the device while training (saving a checkpoint "
                            f"or the plots in {plots}); {' and '.join(map(str, kept))} are as they were. Free some space "
                            f"and run again (train.resume continues from the last whole checkpoint)") from None
    return {"result": result, "trainer_time": trainer_time, "train_time": live_callback.train_seconds, "evals": evals,
            "train_losses": [h["loss"] for h in live_callback.history if "loss" in h]}




def write_reports(staging: Path, reports: Path, stage: str, summary: dict, headline, measurements, extra: dict) -> None:
    """summary.json (what the run did: a function of its inputs, so no measurements and no history), metrics.json
    (headline(summary, dvclive's last values)) and the extra files beside dvclive's plots, then the staging
    directory replaces `reports`: a run that failed before this point leaves the last good reports as they were.
    No plots (a pass-through, no dvclive): an empty loss curve, not an empty directory, which git would not keep."""
    with staged_dir(reports, stage, "--reports", signature=REPORTS_SIGNATURE, staging=staging):
        plots = staging / "plots" / "metrics"
        if not any(plots.rglob("*.tsv")):
            (plots / "train").mkdir(parents=True, exist_ok=True)
            (plots / "train" / "loss.tsv").write_text("step\tloss\n", encoding="utf-8")
        live_summary = staging / "metrics.json"  # dvclive's make_summary, replaced by the headline
        live = json.loads(live_summary.read_text(encoding="utf-8")) if live_summary.is_file() else {}
        write_json(staging / REPORTS_SIGNATURE, {k: v for k, v in summary.items() if k not in (*measurements, "history")})
        write_json(live_summary, headline(summary, live))
        for name, content in extra.items():
            write_json(staging / name, content)


def write_timings(path, summary: dict, keys, history) -> None:
    """A run's measurements (how long, how fast, how much memory, on what) and its per-interval tokens/s, into path
    (reports/timings/<stage>.json): git-ignored and declared nowhere in dvc.yaml, so a rerun or a clone leaves git,
    dvc.lock and `dvc metrics diff` alone (they compare quality); `python -m tools.results` and the benchmarks
    read it. None: not written."""
    if path is None:
        return
    curve = [{"step": e["step"], "tokens_per_s": round(e["tokens_per_s"], 1)} for e in history if "tokens_per_s" in e]
    write_json(Path(path), {**{k: summary[k] for k in keys if k in summary}, "curve": curve})


def peak_memory_mib() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "max RSS"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


