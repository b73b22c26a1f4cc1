"""`ditlab tune`: a Ray Tune sweep over an experiment spec, tracked as nested MLflow runs.

Trials (ASHA or no scheduler) follow Ray's Tune-with-Train V2 pattern: a small driver function per
trial builds a TorchTrainer whose rank 0 reports reach Tune through a TuneReportCallback. Under
PBT a trial runs the training loop in its own process and reports Tune checkpoints, which PBT
copies between trials (the callback sends none).

MLflow: one parent run per sweep; each trial a child run (tag mlflow.parentRunId) created, fed and
closed by a Tune callback on the driver. The sweep folder (<storage>/<name>) holds Tune's experiment
(tune/), the trials' Train runs (train/), and our records: the parent run id, trial runs, the best
spec, the result. Ours stay outside tune/ because a restored Tune run uploads its local copy of that
folder over the stored one when it ends.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator

from ditlab.atomic import atomic_path, write_json
from ditlab.config import SpecError, flatten
from ditlab.evaluation.plots import save_trial_curves
from ditlab.orchestration.ray_session import ensure_ray
from ditlab.orchestration.tracking import Tracker, tracking_uri
from ditlab.orchestration.train import train_worker
from ditlab.sweep import AshaSettings, Distribution, PbtSettings, Sweep, best_spec_yaml
from ditlab.training.loop import Placement, train

# Tune checkpoints kept per trial under PBT: the latest is what another trial copies, and Tune
# warns that 2 or fewer can be deleted before the copy is made.
PBT_CHECKPOINTS_KEPT = 4


ENDED_STATES = ("finished", "stopped_early", "failed")
TUNE_DIR = "tune"  # Tune's experiment folder inside the sweep folder


class SweepFolderError(ValueError):
    """A sweep folder that cannot be started or resumed as asked."""


# -- search space, scheduler, search algorithm ------------------------------------------------------

def to_domain(dist: Distribution):
    if dist.kind == "choice":
        return tune.choice(list(dist.values))
    if dist.kind == "grid":
        return tune.grid_search(list(dist.values))
    if dist.kind == "uniform":
        return tune.uniform(dist.low, dist.high)
    if dist.kind == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    return tune.randint(int(dist.low), int(dist.high))


def param_space(sweep: Sweep) -> dict[str, Any]:
    """Flat dotted keys, as `--set` and MLflow params write them."""
    return {key: to_domain(dist) for key, dist in sweep.spec.space.items()}


def expected_trials(sweep: Sweep) -> int:
    grid = 1
    for dist in sweep.spec.space.values():
        if dist.kind == "grid":
            grid *= len(dist.values)
    return sweep.spec.num_samples * grid


class StepASHA(ASHAScheduler):
    """ASHA in training steps that lets a trial's last report end the trial by itself.

    Stopping a trial at its final report (at max_t, or at a rung on the last step) kills its
    driver while the TorchTrainer is already shutting down; seen here, that left the worker
    group's placement group held and the next trials timed out waiting for CPUs."""

    def __init__(self, base_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.base_steps = base_steps

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        planned = int(trial.config.get("train.steps", self.base_steps))
        if decision == self.STOP and result.get("step", 0) >= planned:
            return self.CONTINUE
        return decision


class StepPBT(PopulationBasedTraining):
    """PBT in training steps that leaves a trial's last report alone: exploiting there would
    restart the trial from another's final checkpoint only to end it again."""

    def __init__(self, base_steps: int, **kwargs):
        super().__init__(**kwargs)
        self.base_steps = base_steps

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("step", 0) >= int(trial.config.get("train.steps", self.base_steps)):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_scheduler(sweep: Sweep):
    """Schedulers count time in training steps (the `step` of each report), not in reports."""
    settings = sweep.spec.scheduler
    if isinstance(settings, AshaSettings):
        steps = sweep.max_steps()
        return StepASHA(sweep.base_spec.train.steps, time_attr="step", max_t=steps + 1,
                        grace_period=settings.grace_period or max(1, steps // 8),
                        reduction_factor=settings.reduction_factor)
    if isinstance(settings, PbtSettings):
        keys = settings.mutate or tuple(k for k, d in sweep.spec.space.items() if d.kind != "grid")
        mutations = {k: _mutation(sweep.spec.space[k]) for k in keys}
        return StepPBT(sweep.base_spec.train.steps, time_attr="step",
                       perturbation_interval=settings.perturbation_interval, hyperparam_mutations=mutations,
                       quantile_fraction=settings.quantile_fraction,
                       resample_probability=settings.resample_probability)
    return FIFOScheduler()


def _mutation(dist: Distribution):
    # PBT moves a listed value to a neighbour and scales a continuous one by 0.8 or 1.2.
    return list(dist.values) if dist.kind in ("choice", "grid") else to_domain(dist)


def make_search(sweep: Sweep):
    """Both limit concurrency themselves: TuneConfig's max_concurrent_trials is ignored with a
    BasicVariantGenerator instance (which we need for its seed), and it wraps Optuna the same way."""
    settings = sweep.spec.search
    if settings.type == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # TPE; metric and mode come from TuneConfig.
        return ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=sweep.spec.max_concurrent)
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=sweep.spec.max_concurrent)


# -- trials ----------------------------------------------------------------------------------------

class MetricReportCallback(TuneReportCallback):
    """Forwards rank 0's reports to Tune, but only those that carry the sweep's metric: Tune
    requires the metric in every result, and the loop's checkpoint-only reports have no val_loss."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def train_trial(config: dict[str, Any], sweep: Sweep, train_storage: str) -> None:
    """One trial under ASHA or no scheduler: a TorchTrainer run named after the trial. A resumed
    sweep reruns an unfinished trial's function, and the Train run of the same name and storage
    continues from its latest checkpoint."""
    trial_id = tune.get_context().get_trial_id()
    spec = sweep.trial_spec(config, f"trial {trial_id}")
    res = spec.resources
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": 1} if res.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.to_dict()},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=trial_id,
            storage_path=train_storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=res.max_failures),
            callbacks=[MetricReportCallback(sweep.spec.metric)],
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()


class TuneCheckpointReporter:
    """The loop's Reporter under PBT: reports that carry the metric go to Tune, with the bundle."""

    def __init__(self, metric: str):
        self.metric = metric

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
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
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
        train(spec, TuneCheckpointReporter(sweep.spec.metric), Placement(), resume_from=resume_dir)


def make_trainable(sweep: Sweep, sweep_dir: Path):
    if isinstance(sweep.spec.scheduler, PbtSettings):
        fn = tune.with_parameters(pbt_trial, sweep=sweep)
        return tune.with_resources(fn, {"cpu": sweep.base_spec.resources.cpus_per_worker})
    fn = tune.with_parameters(train_trial, sweep=sweep, train_storage=str(sweep_dir / "train"))
    return tune.with_resources(fn, {"cpu": sweep.spec.resources.driver_cpus})


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# -- MLflow: one child run per trial ---------------------------------------------------------------

def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The loop's numbers in a Tune result, without Tune's bookkeeping."""
    skip = set(AUTO_RESULT_KEYS) | {"step"}
    return {k: float(v) for k, v in result.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)}


class TrialRuns:
    """trial id -> {run_id, state, error}: kept in <sweep>/trial_runs.json so that a resumed sweep
    reopens each trial's run instead of starting a second one."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def update(self, trial_id: str, **fields) -> None:
        records = self.load()
        records.setdefault(trial_id, {}).update(fields)
        write_json(self.path, records)


class SweepTracking(tune.Callback):
    """Driver-side Tune callback: a nested MLflow run per trial, with its params, every result, and
    its end state: FINISHED, KILLED with ditlab.trial_state=stopped_early (the scheduler stopped it
    before its last step), FAILED with the error as a tag and error.txt. Pickled with Tune's state,
    so it holds only plain data and reopens MLflow clients lazily."""

    def __init__(self, sweep: Sweep, parent_run_id: str, sweep_dir: Path):
        self.sweep, self.parent_run_id, self.sweep_dir = sweep, parent_run_id, sweep_dir
        self.records = TrialRuns(sweep_dir / "trial_runs.json")
        self._trackers: dict[str, Tracker] = {}

    def __getstate__(self):
        return {**self.__dict__, "_trackers": {}}

    def _tracker(self, trial) -> Tracker:
        if trial.trial_id in self._trackers:
            return self._trackers[trial.trial_id]
        record = self.records.load().get(trial.trial_id)
        if record:
            tracker = Tracker.resume(record["run_id"])
        else:
            config = dict(trial.config)
            try:
                spec = self.sweep.trial_spec(config)
            except SpecError:
                spec = None  # the trial itself will fail and say why
            tracker = Tracker.start_child(spec, self.parent_run_id, f"{self.sweep.spec.name}/{trial.trial_id}",
                                          params=config, tags={"ditlab.sweep": self.sweep.spec.name,
                                                               "ditlab.trial_id": trial.trial_id,
                                                               "ditlab.sampled": json.dumps(config, sort_keys=True)})
            self.records.update(trial.trial_id, run_id=tracker.run_id)
        tracker.set_tags({"ditlab.trial_state": "running"})
        self._trackers[trial.trial_id] = tracker
        return tracker

    def on_trial_start(self, iteration, trials, trial, **info):
        self._tracker(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = result_metrics(result)
        if isinstance(self.sweep.spec.scheduler, PbtSettings):  # PBT changes the config as it goes
            metrics.update({f"config.{k}": float(v) for k, v in trial.config.items()
                            if isinstance(v, int | float) and not isinstance(v, bool)})
        self._tracker(trial).log_metrics(metrics, int(result.get("step", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last_step = int((trial.last_result or {}).get("step", 0))
        planned = int(trial.config.get("train.steps", self.sweep.base_spec.train.steps))
        finished = last_step >= planned
        state = "finished" if finished else "stopped_early"
        tracker = self._tracker(trial)
        tracker.set_tags({"ditlab.trial_state": state, "ditlab.last_step": last_step})
        if isinstance(self.sweep.spec.scheduler, PbtSettings):  # params hold the initial values
            tracker.set_tags({"ditlab.final_config": json.dumps(dict(trial.config), sort_keys=True)})
        tracker.end("FINISHED" if finished else "KILLED")
        self.records.update(trial.trial_id, state=state)
        self._trackers.pop(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        text = _error_text(trial)
        tracker = self._tracker(trial)
        tracker.set_tags({"ditlab.trial_state": "failed", "ditlab.error": _error_summary(text)})
        tracker.log_text(text, "error.txt")
        tracker.end("FAILED")
        self.records.update(trial.trial_id, state="failed", error=_error_summary(text))
        self._trackers.pop(trial.trial_id, None)

    def on_experiment_end(self, trials, **info):
        # Trials still open here were interrupted (Ctrl-C): `--resume` reopens their runs.
        for trial_id, tracker in list(self._trackers.items()):
            tracker.set_tags({"ditlab.trial_state": "interrupted"})
            tracker.end("KILLED")
            self.records.update(trial_id, state="interrupted")
        self._trackers.clear()


def _error_text(trial) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text()
    return str(trial.get_pickled_error() or "unknown error")


EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: \S")


def _error_summary(text: str, limit: int = 500) -> str:
    """The last `package.ExceptionName: message` line: for a Ray error wrapping a worker's
    traceback, the worker's own exception."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if EXCEPTION_LINE.match(ln)]
    return (named[-1] if named else lines[-1] if lines else "unknown error")[:limit]


# -- the sweep -------------------------------------------------------------------------------------

def sweep_folder(sweep: Sweep, storage: Path, name: str | None, resume: bool) -> Path:
    """The folder to run in: a new <storage>/<name> or, with `resume`, an existing one (the latest
    of this sweep when no name is given) whose recorded sweep spec equals this one."""
    if resume:
        if name is None:
            candidates = sorted(storage.glob(f"{sweep.spec.name}-*/sweep.yaml"), key=lambda p: p.stat().st_mtime)
            if not candidates:
                raise SweepFolderError(f"--resume: no sweep named {sweep.spec.name}-* under {storage}")
            folder = candidates[-1].parent
        else:
            folder = storage / name
        if not (folder / TUNE_DIR / "tuner.pkl").is_file():
            raise SweepFolderError(f"--resume: {folder} holds no sweep to resume")
        recorded = yaml.safe_load((folder / "sweep.yaml").read_text())
        changed = sorted(k for k, v in flatten(sweep_record(sweep)).items() if flatten(recorded).get(k) != v)
        if changed:
            raise SweepFolderError(f"--resume: the sweep spec differs from the one {folder.name} started with "
                                   f"({', '.join(changed[:5])}); resume with the original or start a new --name")
        return folder
    folder = storage / (name or f"{sweep.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if folder.exists():
        raise SweepFolderError(f"sweep folder {folder} exists: pass --resume to continue it, or another --name")
    return folder


def sweep_record(sweep: Sweep) -> dict[str, Any]:
    return {"sweep": sweep.to_dict(), "base": sweep.base_raw}


def open_parent(sweep: Sweep, sweep_dir: Path) -> Tracker:
    record = sweep_dir / "tracking.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("tracking_uri") == tracking_uri():
            tracker = Tracker.resume(saved["run_id"])
            tracker.set_tags({"ditlab.sweep_state": "running"})
            return tracker
    tracker = Tracker.create(sweep.experiment, sweep_dir.name, tags={
        "ditlab.sweep": sweep.spec.name, "ditlab.kind": "sweep", "ditlab.sweep_dir": str(sweep_dir),
        "ditlab.sweep_state": "running"})
    s = sweep.spec
    tracker.log_params({"sweep.metric": s.metric, "sweep.mode": s.mode, "sweep.scheduler": s.scheduler.type,
                        "sweep.search": s.search.type, "sweep.num_samples": s.num_samples,
                        "sweep.max_concurrent": s.max_concurrent, "sweep.space": ", ".join(s.space),
                        **{f"scheduler.{k}": v for k, v in s.scheduler.model_dump().items() if k != "type"}})
    tracker.log_text(yaml.safe_dump(sweep_record(sweep), sort_keys=False), "sweep.yaml")
    write_json(record, {"run_id": tracker.run_id, "tracking_uri": tracker.uri})
    return tracker


def build_tuner(sweep: Sweep, sweep_dir: Path, parent: Tracker, progress: bool, resume: bool) -> tune.Tuner:
    trainable = make_trainable(sweep, sweep_dir)
    if resume:
        # Finished and failed trials stay as they are; unfinished ones continue (see train_trial).
        return tune.Tuner.restore(str(sweep_dir / TUNE_DIR), trainable, resume_unfinished=True)
    s = sweep.spec
    pbt = isinstance(s.scheduler, PbtSettings)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=make_scheduler(sweep),
                                    search_alg=make_search(sweep), num_samples=s.num_samples,
                                    trial_dirname_creator=trial_dirname,
                                    # PBT restarts trials with another's checkpoint: keep the process.
                                    reuse_actors=pbt),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=str(sweep_dir),
            callbacks=[SweepTracking(sweep, parent.run_id, sweep_dir)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=PBT_CHECKPOINTS_KEPT if pbt else None),
            verbose=1 if progress else 0,
        ),
    )


def run_sweep(sweep: Sweep, *, address: str | None = None, storage_path: str | Path = "sweeps",
              name: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) a sweep. Returns the summary also written to <sweep dir>/result.json."""
    storage = Path(storage_path).resolve()
    sweep_dir = sweep_folder(sweep, storage, name, resume)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        with atomic_path(sweep_dir / "sweep.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(sweep_record(sweep), sort_keys=False))
    ensure_ray(address)
    parent = open_parent(sweep, sweep_dir)
    try:
        results = build_tuner(sweep, sweep_dir, parent, progress, resume).fit()
        summary = summarize(sweep, sweep_dir, results, parent)
    except BaseException as err:
        stopped = isinstance(err, KeyboardInterrupt)  # a second Ctrl-C: Tune's state is saved all the same
        parent.set_tags({"ditlab.sweep_state": "interrupted" if stopped else "failed"})
        parent.end("KILLED" if stopped else "FAILED")
        raise
    write_json(sweep_dir / "result.json", summary)
    parent.log_artifact(sweep_dir / "result.json")
    parent.set_tags({"ditlab.sweep_state": "interrupted" if summary["interrupted"] else "finished"})
    parent.end("KILLED" if summary["interrupted"] else "FINISHED")
    return summary


def summarize(sweep: Sweep, sweep_dir: Path, results, parent: Tracker) -> dict:
    """Per-trial figures, the best trial, its spec, the comparison plot; logged on the parent run."""
    s = sweep.spec
    records = TrialRuns(sweep_dir / "trial_runs.json").load()
    trials, curves = [], []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        record = records.get(trial_id, {})
        config = dict(result.config or {}) or _recorded_config(Path(result.path))
        workers = _workers(sweep, config)
        history = result.metrics_dataframe
        has_metric = history is not None and s.metric in getattr(history, "columns", ())
        points = history[["step", s.metric]].dropna() if has_metric else None
        trials.append({
            "trial_id": trial_id,
            "state": record.get("state", "failed" if result.error else "pending"),
            "config": config,
            "last_step": int(metrics.get("step", 0)),
            s.metric: metrics.get(s.metric),
            "worker_seconds": float(metrics.get("time_total_s", 0.0)) * workers,
            "mlflow_run_id": record.get("run_id"),
            "checkpoint": metrics.get("checkpoint_path"),
            **({"error": record.get("error") or _error_summary(str(result.error))} if result.error else {}),
        })
        curves.append({"label": trial_id, "state": trials[-1]["state"].replace("_", " "),
                       "steps": points["step"].tolist() if points is not None else [],
                       "values": points[s.metric].tolist() if points is not None else []})
    ranked = [t for t in trials if t["state"] != "failed" and t[s.metric] is not None]
    best = (min if s.mode == "min" else max)(ranked, key=lambda t: t[s.metric]) if ranked else None
    summary = {
        "sweep": s.name, "sweep_dir": str(sweep_dir), "metric": s.metric, "mode": s.mode,
        "scheduler": s.scheduler.type, "search": s.search.type,
        "num_trials": len(trials), "expected_trials": expected_trials(sweep),
        "states": {st: sum(t["state"] == st for t in trials) for st in sorted({t["state"] for t in trials})},
        "worker_seconds": sum(t["worker_seconds"] for t in trials),
        "steps_trained": sum(t["last_step"] for t in trials),
        "trials": trials, "best": best, "best_spec": None,
        "mlflow_run_id": parent.run_id, "mlflow_experiment_id": parent.experiment_id,
        "mlflow_tracking_uri": parent.uri, "mlflow_url": parent.url,
    }
    # Tune marks the trials it stops on Ctrl-C as terminated; the callback's records know better.
    summary["interrupted"] = (any(t["state"] not in ENDED_STATES for t in trials)
                              or len(trials) < summary["expected_trials"])
    if best is not None:
        for curve in curves:
            if curve["label"] == best["trial_id"]:
                curve["state"] = "best"
        best_path = sweep_dir / "best_spec.yaml"
        with atomic_path(best_path) as tmp:
            tmp.write_text(best_spec_yaml(sweep, best["config"], f"{s.name}-best"))
        summary["best_spec"] = str(best_path)
        parent.log_metrics({f"best_{s.metric}": best[s.metric]}, best["last_step"])
        parent.set_tags({"ditlab.best_trial": best["trial_id"]})
        parent.log_artifact(best_path)
        if not summary["interrupted"]:  # MLflow params are write-once: only the final best
            parent.log_params({f"best.{k}": v for k, v in best["config"].items()})
    parent.log_metrics({"worker_seconds": summary["worker_seconds"], "steps_trained": summary["steps_trained"],
                        "num_trials": len(trials)})
    figure = save_trial_curves(curves, sweep_dir / "trials.png", s.metric,
                               title=f"{s.name}: {s.metric} per trial ({s.scheduler.type})")
    parent.log_artifact(figure, "figures")
    return summary


def _recorded_config(trial_dir: Path) -> dict[str, Any]:
    """A restored trial that never reported has no config in its Result; Tune's params.json has it."""
    params = trial_dir / "params.json"
    return json.loads(params.read_text()) if params.is_file() else {}


def _workers(sweep: Sweep, config: dict[str, Any]) -> int:
    try:
        return sweep.trial_spec(config).resources.num_workers
    except SpecError:
        return sweep.base_spec.resources.num_workers
