"""What runs for one trial. Under ASHA or no scheduler: a small driver function per trial that fits a
TorchTrainer (Ray's Tune-with-Train V2 pattern) whose rank 0 reports reach Tune through a
TuneReportCallback. Under PBT: the training loop in the trial's own process, reporting Tune
checkpoints, which PBT copies between trials (the callback sends none)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from ray import tune

from ditlab.config import from_dict
from ditlab.orchestration.remote import MetricReportCallback
from ditlab.orchestration.trainer import build_trainer, worker_spec
from ditlab.sweep import PbtSettings, Sweep
from ditlab.training.loop import Placement, train


def train_trial(config: dict[str, Any], sweep: Sweep, train_storage: str) -> None:
    """One trial under ASHA or no scheduler: a TorchTrainer run named after the trial. A resumed
    sweep reruns an unfinished trial's function, and the Train run of the same name and storage
    continues from its latest checkpoint."""
    trial_id = tune.get_context().get_trial_id()
    spec = sweep.trial_spec(config, f"trial {trial_id}")
    trainer = build_trainer(spec, name=trial_id, storage=train_storage,
                            callbacks=[MetricReportCallback(sweep.spec.metric)], checkpoints_kept=1)
    trainer.fit()


class TuneCheckpointReporter:
    """The loop's Reporter under PBT: reports that carry the metric go to Tune, with the bundle."""

    def __init__(self, metric: str):
        self.metric = metric

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None, *,
               checkpoint_step: bool = False) -> None:
        if self.metric not in metrics:
            return
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(dict(metrics), checkpoint=checkpoint)


def pbt_trial(config: dict[str, Any], sweep: Sweep) -> None:
    """One PBT trial: the loop in this process, a checkpoint at every validation step (what PBT
    copies when this trial is among the best). A trial PBT restarts from another trial's checkpoint
    continues from that step with its own, perturbed config."""
    trial_id = tune.get_context().get_trial_id()
    spec = sweep.trial_spec(config, f"trial {trial_id}")
    every = spec.train.val_every or spec.train.log_every
    spec = sweep.trial_spec({**config, "train.val_every": every, "train.checkpoint_every": every}, f"trial {trial_id}")
    spec = from_dict(worker_spec(spec), f"trial {trial_id}")  # Tune runs the trial in its own folder
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
        train(spec, TuneCheckpointReporter(sweep.spec.metric), Placement(), resume_from=resume_dir)


TRAIN_DIR = "train"  # <sweep dir>/train/<trial id>/checkpoint_*: each ASHA trial's Train run


def make_trainable(sweep: Sweep, sweep_dir: Path):
    if isinstance(sweep.spec.scheduler, PbtSettings):
        fn = tune.with_parameters(pbt_trial, sweep=sweep)
        return tune.with_resources(fn, {"cpu": sweep.base_spec.resources.cpus_per_worker})
    fn = tune.with_parameters(train_trial, sweep=sweep, train_storage=str(sweep_dir / TRAIN_DIR))
    return tune.with_resources(fn, {"cpu": sweep.spec.resources.driver_cpus})


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"
