"""The end of a sweep: one row per trial, the best trial, totals, the best spec and the comparison plot.

The rows, the best trial and the totals are pure functions of Tune's results and our records (each
has a unit test); `summarize` writes the files and logs them on the sweep's parent run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ditlab.atomic import atomic_path
from ditlab.config import SpecError, from_dict
from ditlab.evaluation.plots import save_trial_curves
from ditlab.orchestration.tracking import Tracker
from ditlab.orchestration.tune.space import expected_trials
from ditlab.orchestration.tune.trial_runs import ENDED_STATES, TrialRuns, error_summary
from ditlab.orchestration.tune.trials import TRAIN_DIR
from ditlab.sweep import Sweep, best_spec_yaml
from ditlab.training.checkpoint import checkpoint_dirs, load_bundle
from ditlab.training.tasks import task_class


def trial_row(result, record: dict[str, Any], config: dict[str, Any], metric: str, workers: int) -> dict[str, Any]:
    """One trial's line of the summary from its Tune Result, our record of it (run id, state) and
    its config."""
    metrics = result.metrics or {}
    row = {
        "trial_id": trial_id_of(result),
        "state": record.get("state", "failed" if result.error else "pending"),
        "config": config,
        "last_step": int(metrics.get("step", 0)),
        metric: metrics.get(metric),
        "worker_seconds": float(metrics.get("time_total_s", 0.0)) * workers,
        "mlflow_run_id": record.get("run_id"),
        "checkpoint": metrics.get("checkpoint_path"),
    }
    if result.error:
        row["error"] = record.get("error") or error_summary(str(result.error))
    return row


def trial_id_of(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix("trial_")


def trial_curve(result, trial_id: str, state: str, metric: str) -> dict[str, Any]:
    """The metric over the steps of one trial, for the comparison plot."""
    history = result.metrics_dataframe
    has_metric = history is not None and metric in getattr(history, "columns", ())
    points = history[["step", metric]].dropna() if has_metric else None
    return {"label": trial_id, "state": state.replace("_", " "),
            "steps": points["step"].tolist() if points is not None else [],
            "values": points[metric].tolist() if points is not None else []}


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial with the best value of `metric` among those that did not fail; None if none has one."""
    ranked = [t for t in trials if t["state"] != "failed" and t.get(metric) is not None]
    if not ranked:
        return None
    return (min if mode == "min" else max)(ranked, key=lambda t: t[metric])


def totals(trials: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    """Counts per state, compute spent, and whether the sweep was interrupted: a trial not in an
    ended state (Tune marks the trials it stops on Ctrl-C as terminated; our records know better),
    or fewer trials than the sweep asks for."""
    return {
        "num_trials": len(trials), "expected_trials": expected,
        "states": {st: sum(t["state"] == st for t in trials) for st in sorted({t["state"] for t in trials})},
        "worker_seconds": sum(t["worker_seconds"] for t in trials),
        "steps_trained": sum(t["last_step"] for t in trials),
        "interrupted": any(t["state"] not in ENDED_STATES for t in trials) or len(trials) < expected,
    }


def summarize(sweep: Sweep, sweep_dir: Path, results, parent: Tracker) -> dict:
    """Per-trial figures, the best trial, its spec, the comparison plot; logged on the parent run."""
    s = sweep.spec
    records = TrialRuns(sweep_dir / "trial_runs.json").load()
    trials, curves = [], []
    for result in results:
        record = records.get(trial_id_of(result), {})
        config = dict(result.config or {}) or recorded_config(Path(result.path))
        row = trial_row(result, record, config, s.metric, workers_of(sweep, config))
        trials.append(row)
        curves.append(trial_curve(result, row["trial_id"], row["state"], s.metric))
    best = best_trial(trials, s.metric, s.mode)
    summary = {
        "sweep": s.name, "sweep_dir": str(sweep_dir), "metric": s.metric, "mode": s.mode,
        "scheduler": s.scheduler.type, "search": s.search.type,
        **totals(trials, expected_trials(sweep)),
        "trials": trials, "best": best, "best_spec": None,
        "mlflow_run_id": parent.run_id, "mlflow_experiment_id": parent.experiment_id,
        "mlflow_tracking_uri": parent.uri, "mlflow_url": parent.url,
    }
    if best is not None:
        for curve in curves:
            if curve["label"] == best["trial_id"]:
                curve["state"] = "best"
        summary["best_spec"] = str(export_best(sweep, sweep_dir, best, parent, final=not summary["interrupted"]))
        if s.evaluate_best:
            summary["best_evaluation"] = evaluate_best(sweep_dir, best, parent)
    parent.log_metrics({"worker_seconds": summary["worker_seconds"], "steps_trained": summary["steps_trained"],
                        "num_trials": len(trials)})
    figure = save_trial_curves(curves, sweep_dir / "trials.png", s.metric,
                               title=f"{s.name}: {s.metric} per trial ({s.scheduler.type})")
    parent.log_artifact(figure, "figures")
    return summary


def export_best(sweep: Sweep, sweep_dir: Path, best: dict[str, Any], parent: Tracker, final: bool) -> Path:
    """best_spec.yaml (a ready experiment spec), logged with the best value on the parent run; the
    best config as params only when `final` (MLflow params are write-once)."""
    s = sweep.spec
    path = sweep_dir / "best_spec.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(best_spec_yaml(sweep, best["config"], f"{s.name}-best"))
    parent.log_metrics({f"best_{s.metric}": best[s.metric]}, best["last_step"])
    parent.set_tags({"ditlab.best_trial": best["trial_id"]})
    parent.log_artifact(path)
    if final:
        parent.log_params({f"best.{k}": v for k, v in best["config"].items()})
    return path


def evaluate_best(sweep_dir: Path, best: dict[str, Any], parent: Tracker) -> dict[str, Any]:
    """The best trial's last checkpoint, evaluated as its task evaluates checkpoints (`ditlab
    evaluate` would give the same figures); logged on the parent run as best_<figure>. The trials
    themselves report only the cheap figure their scheduler compares."""
    folders = checkpoint_dirs(sweep_dir / TRAIN_DIR / best["trial_id"])
    if not folders:  # PBT keeps its checkpoints in Tune's folders; a trial may also have none yet
        return {"skipped": f"no checkpoint of trial {best['trial_id']} under {sweep_dir / TRAIN_DIR}"}
    bundle = load_bundle(folders[-1])
    spec = from_dict(bundle["spec"], f"spec stored in {folders[-1]}")
    report = task_class(spec.task).evaluate_checkpoint(bundle, str(folders[-1]))
    parent.log_metrics({f"best_{k}": v for k, v in report.figures.items()}, best["last_step"])
    return {"checkpoint": str(folders[-1]), **report.to_dict()}


def recorded_config(trial_dir: Path) -> dict[str, Any]:
    """A restored trial that never reported has no config in its Result; Tune's params.json has it."""
    params = trial_dir / "params.json"
    return json.loads(params.read_text()) if params.is_file() else {}


def workers_of(sweep: Sweep, config: dict[str, Any]) -> int:
    try:
        return sweep.trial_spec(config).resources.num_workers
    except SpecError:
        return sweep.base_spec.resources.num_workers
