"""Callbacks of a training run: dvclive logging (plots declared in dvc.yaml; loss, eval loss, learning rate, token
counts a logging step) and a progress bar on stderr.
"""

from __future__ import annotations

import time
from pathlib import Path

from wenyan.distributed import world
from wenyan.errors import PipelineError, get_logger

log = get_logger("training")


class NoLive:
    step = 0
    log_metric = make_summary = end = staticmethod(lambda *args, **kwargs: None)


def open_live(reports: Path):
    """dvclive logging into `reports` (the staging directory; dvc.yaml declares its plots; dvcyaml=False so
    it never edits dvc.yaml). Without dvclive (a bare GPU machine running benchmarks) training goes on
    without plots; under DDP only rank 0 logs."""
    if world()[0] != 0:
        return NoLive()
    try:
        from dvclive import Live
    except ImportError:
        log.warning("dvclive is not installed: no plots under %s (pip install dvclive)", reports)
        return NoLive()
    try:
        return Live(str(reports), dvcyaml=False, save_dvc_exp=False, report=None)
    except Exception as exc:  # dvclive 3.49 raises scmrepo's SCMError in a git repo with no commit yet
        if "Empty git repo" in str(exc):
            raise PipelineError("this git repository has no commit yet; commit once (git add -A && git commit) "
                                "before dvc repro, as DVC experiments need a commit too") from None
        raise


def make_progress_callback():
    """A progress bar on stderr (rank 0): training steps done of the total, elapsed and ETA, steps/s, and the
    last logged loss; a second bar while an eval runs (the CPU default's eval of 32 rows takes ~15 s)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self):
            self.bar = self.eval_bar = None
            self.postfix = {}

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if self.bar is not None and ("loss" in logs or "eval_loss" in logs):
                if "loss" in logs:
                    self.postfix["loss"] = f"{logs['loss']:.4f}"
                if "eval_loss" in logs:
                    self.postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
                self.bar.set_postfix(self.postfix)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.eval_bar is None:
                total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else None
                self.eval_bar = tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
            self.eval_bar.update(1)

        def on_evaluate(self, args, state, control, **kwargs):
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return ProgressCallback()


def make_live_callback(live, trainer_ref: dict):
    from transformers import TrainerCallback

    class LiveCallback(TrainerCallback):
        """Loss, eval loss, learning rate and tokens/s per logging step into dvclive (x = step)."""

        def __init__(self):
            self.last_time = None
            self.last_tokens = 0
            self.history = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time = time.perf_counter()
            self.train_seconds = 0.0  # training time only (eval excluded), for benchmarks/train_backends.py

        def on_train_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.train_seconds += now - self.last_time  # steps after the last logged one
            self.last_time = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            trainer = trainer_ref["trainer"]
            live.step = state.global_step
            entry = {"step": state.global_step}
            if "loss" in logs:
                now = time.perf_counter()
                # under DDP: this process's share x processes (no collective here; summary.json has exact sums)
                tokens = (trainer.tokens_seen - self.last_tokens) * world()[2]
                rate = tokens / max(now - self.last_time, 1e-9)
                log.info("step %d: loss %.4f, %.0f tokens/s", state.global_step, logs["loss"], rate)
                self.train_seconds += now - self.last_time
                self.last_time, self.last_tokens = now, trainer.tokens_seen
                entry.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), tokens_per_s=rate,
                             tokens=trainer.tokens_seen * world()[2],
                             completion_tokens=trainer.completion_tokens_seen * world()[2],
                             train_seconds=self.train_seconds)
                live.log_metric("train/loss", float(logs["loss"]))
                if logs.get("learning_rate") is not None:
                    live.log_metric("train/learning_rate", float(logs["learning_rate"]))
                # tokens/s is a measurement, not a function of deps and params: write_timings, not dvclive's plots
            if "eval_loss" in logs:
                entry["eval_loss"] = logs["eval_loss"]
                live.log_metric("eval/loss", float(logs["eval_loss"]))
                self.last_time = time.perf_counter()  # eval time is not training time
            if len(entry) > 1:
                self.history.append(entry)
                live.make_summary()

    return LiveCallback()


