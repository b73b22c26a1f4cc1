"""MLflow tracking: the only module in ditlab that imports mlflow.

Uses MlflowClient with explicit run ids (not the fluent, thread-local API), because metrics
arrive on a background thread while the driver waits on Ray."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from ditlab.config import ExperimentSpec, flatten

# Without this tag MLflow 3.x opens an experiment in its GenAI view; with it, the runs table.
EXPERIMENT_KIND_TAG = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in the working directory (absolute, so Ray
    workers and subprocesses with another cwd write to the same store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_dirty(cwd: str | Path | None = None) -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def experiment_of_run(run_id: str) -> str:
    """The name of the experiment holding `run_id`."""
    client = MlflowClient(tracking_uri=tracking_uri())
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


class Tracker:
    """One MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, uri: str):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri

    @classmethod
    def create(cls, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
        """A new run in `experiment` (created with the runs-table tag if missing), tagged with the
        git commit of the working directory."""
        uri = tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment, tags=EXPERIMENT_KIND_TAG)
        else:
            experiment_id = found.experiment_id
            if found.tags.get("mlflow.experimentKind") is None:
                client.set_experiment_tag(experiment_id, *next(iter(EXPERIMENT_KIND_TAG.items())))
        all_tags = {}
        commit = git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
            all_tags["ditlab.git_dirty"] = str(git_dirty())
        elif os.environ.get("DITLAB_GIT_COMMIT"):  # a Ray Job's unpacked folder: `ditlab submit` recorded it
            all_tags["mlflow.source.git.commit"] = os.environ["DITLAB_GIT_COMMIT"]
            all_tags["ditlab.git_dirty"] = os.environ.get("DITLAB_GIT_DIRTY", "None")
        all_tags.update(tags or {})
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(client, run.info.run_id, experiment_id, uri)

    @classmethod
    def start(cls, spec: ExperimentSpec, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
        """A training run: every spec field as a param, the resolved spec as spec.yaml."""
        tags = {"ditlab.spec_name": spec.name, "ditlab.data_source": spec.data.source, **(tags or {})}
        tracker = cls.create(spec.tracking.experiment, run_name, tags)
        tracker.log_params(flatten(spec.to_dict()))
        tracker.client.log_text(tracker.run_id, spec.to_yaml(), "spec.yaml")
        return tracker

    @classmethod
    def resume(cls, run_id: str) -> Tracker:
        """Reopen an existing run (a `ditlab run --name` that continues an interrupted run)."""
        uri = tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id, run.info.experiment_id, uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(mlflow.utils.time.get_current_time_millis())
        batch = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    @classmethod
    def start_child(cls, spec: ExperimentSpec | None, parent_run_id: str, run_name: str,
                    params: dict[str, Any], tags: dict[str, str] | None = None) -> Tracker:
        """A run nested under `parent_run_id` (a sweep's trial) in the parent's experiment: the
        spec's fields as params when the trial has a valid spec, else just `params`."""
        client = MlflowClient(tracking_uri=tracking_uri())
        experiment = client.get_experiment(client.get_run(parent_run_id).info.experiment_id).name
        tags = {"mlflow.parentRunId": parent_run_id, **(tags or {})}
        if spec is not None:
            return cls.start(spec.model_copy(update={"tracking": spec.tracking.model_copy(
                update={"experiment": experiment})}), run_name, tags)
        tracker = cls.create(experiment, run_name, tags)
        tracker.log_params(params)
        return tracker

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    @property
    def url(self) -> str:
        """Where to look at this run: the dashboard URL, or the command that opens one."""
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}  (then #/experiments/{self.experiment_id}/runs)"
