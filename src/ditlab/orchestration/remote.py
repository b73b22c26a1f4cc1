"""What Ray Train unpickles in its own processes: the workers' function and the callbacks that run in
its controller. Both travel by reference (module and name), so unpickling them imports this module.

Kept light on purpose: it imports Ray Train and nothing heavy of ditlab's. The controller unpickles
the function and the callbacks before it starts the workers; when they lived beside the driver's
code, that import (torch, MLflow, the evaluation suite) took about 5 s on the quickstart's 2-core
machine, all of it before the first worker started, and each worker imported MLflow and the
evaluation suite it never uses (BENCHMARKS.md, "Start-up")."""

from __future__ import annotations

from pathlib import Path

from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from ditlab.atomic import fsync_tree
from ditlab.orchestration.console import quiet_train_controller, verbose_requested


def train_worker(config: dict) -> None:
    """Runs on each Ray Train worker: the training loop (orchestration/trainer.py, imported here,
    in the worker, where it runs)."""
    from ditlab.orchestration.trainer import run_worker

    run_worker(config)


class _QuietsController:
    """For the callbacks below: unpickled in Ray Train's controller, where they are the only code of
    ours, before it starts the run, they quiet its console there as the driver chose
    (console.quiet_train_controller)."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        quiet_train_controller(state.get("verbose"))


class CheckpointSync(_QuietsController, UserCallback):
    """Runs in the Ray Train controller; makes each checkpoint Ray Train records durable (fsync) on a
    filesystem this machine sees. The reports' metrics reach the driver from rank 0 directly
    (trainer.RayReporter's relay)."""

    def __init__(self):
        self.verbose = verbose_requested()

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None and Path(checkpoint.path).is_dir():  # Ray Train's copy, on a filesystem we see
            fsync_tree(checkpoint.path)


class MetricReportCallback(_QuietsController, TuneReportCallback):
    """Runs in a Tune trial's Ray Train controller; forwards rank 0's reports to Tune, but only those
    that carry the sweep's metric: Tune requires the metric in every result, and the loop's
    checkpoint-only reports have no val_loss."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric
        self.verbose = verbose_requested()

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)
