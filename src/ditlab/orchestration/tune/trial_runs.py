"""MLflow for a sweep's trials: one run per trial, nested under the sweep's parent run, created, fed
and closed by a Tune callback on the driver."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS

from ditlab.atomic import write_json
from ditlab.config import SpecError
from ditlab.orchestration.tracking import Tracker
from ditlab.sweep import PbtSettings, Sweep

ENDED_STATES = ("finished", "stopped_early", "failed")


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
        text = error_text(trial)
        tracker = self._tracker(trial)
        tracker.set_tags({"ditlab.trial_state": "failed", "ditlab.error": error_summary(text)})
        tracker.log_text(text, "error.txt")
        tracker.end("FAILED")
        self.records.update(trial.trial_id, state="failed", error=error_summary(text))
        self._trackers.pop(trial.trial_id, None)

    def on_experiment_end(self, trials, **info):
        # Trials still open here were interrupted (Ctrl-C): `--resume` reopens their runs.
        for trial_id, tracker in list(self._trackers.items()):
            tracker.set_tags({"ditlab.trial_state": "interrupted"})
            tracker.end("KILLED")
            self.records.update(trial_id, state="interrupted")
        self._trackers.clear()


def error_text(trial) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text()
    return str(trial.get_pickled_error() or "unknown error")


EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: \S")


def error_summary(text: str, limit: int = 500) -> str:
    """The last `package.ExceptionName: message` line: for a Ray error wrapping a worker's
    traceback, the worker's own exception."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if EXCEPTION_LINE.match(ln)]
    return (named[-1] if named else lines[-1] if lines else "unknown error")[:limit]
