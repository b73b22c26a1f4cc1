"""MLflow tracking: the only module in ditlab that imports mlflow.

Uses MlflowClient with explicit run ids (not the fluent, thread-local API), because metrics
arrive on a background thread while the driver waits on Ray.

What the dashboard shows, and where it comes from:
- metric charts grouped in sections by name prefix (`train/`, `val/`, `eval/`, `time/`, `sweep/`):
  `mlflow_metric_name` is the one table from ditlab's raw keys (kept as they are in metrics.json,
  result.json, history.json and Tune's results) to MLflow names;
- the runs table's Dataset column: the run's data as an MLflow dataset input (`log_dataset`);
- its Source, Version and User columns: the `mlflow.source.*` and `mlflow.user` tags;
- the sample grid as an image chart at its step (`log_image`)."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from ditlab.config import ExperimentSpec, flatten
from ditlab.redact import redact_uri

# MLflow prints "View run ... at: URL" when a run ends, the URL built from the tracking URI as
# given, password included. ditlab prints its own link, redacted (Tracker.url).
os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

# Without this tag MLflow 3.x opens an experiment in its GenAI view; with it, the runs table.
EXPERIMENT_KIND_TAG = {"mlflow.experimentKind": "custom_model_development"}


# -- metric names ----------------------------------------------------------------------------------

# Raw key -> MLflow name, for the keys whose name changes beyond a prefix.
RENAMED = {
    "val_loss": "val/loss",
    "val_psnr": "val/psnr",
    "val_ssim": "val/ssim",  # restoration's validation, beside val_psnr
    "final_val_loss": "val/final_loss",
    "eval_num_samples": "eval/num_samples",
    "samples": "eval/samples",  # the sample grid (an image chart, `Tracker.log_image`)
}
# The training loop's reports (loss terms, optimizer, throughput) and the run's last training loss.
TRAIN_KEYS = frozenset({"loss", "mse", "vb", "lr", "grad_norm", "images_per_sec", "epoch", "final_loss",
                        "skipped_steps",  # steps skipped for a non-finite loss or gradient (training/loop.py)
                        # the adversarial terms (loss.adversarial_weight): generator, discriminator, weight
                        "g_loss", "d_loss", "d_weight", "logits_real", "logits_fake",
                        # the autoencoder's other terms
                        "rec_loss", "kl", "perceptual"})
# The evaluation suite's figures (generative and reconstruction protocols).
EVAL_KEYS = frozenset({
    "fid", "fid_num_fake", "fid_num_real", "kid", "kid_std", "precision", "recall",
    "inception_score", "inception_score_std", "classifier_score", "classifier_score_std",
    "conditional_accuracy", "classifier_test_accuracy", "psnr", "ssim", "lpips",
    "rfid", "sharpness", "sharpness_original", "sharpness_ratio",
})
# A sweep's parent run: the best trial's figure (`best_<metric>`) and the sweep's totals.
SWEEP_KEYS = frozenset({"steps_trained", "num_trials"})


def mlflow_metric_name(key: str, kind: str = "train") -> str:
    """The MLflow name of a raw metric key. The prefix is the chart section the MLflow dashboard
    puts it in. `kind` is the run's `ditlab.kind` tag: in an evaluation run every figure (`mse`
    too) is an evaluation figure. Keys with a `/` are MLflow names already; an unknown key stays
    as it is (MLflow shows it ungrouped).

    | raw key                                             | MLflow name                   |
    |-----------------------------------------------------|-------------------------------|
    | loss mse vb lr grad_norm images_per_sec epoch        | train/<key>                   |
    | final_loss                                          | train/final_loss              |
    | g_loss d_loss d_weight logits_real logits_fake       | train/<key>                   |
    | val_loss, final_val_loss, val_psnr, val_ssim        | val/loss, val/final_loss, val/psnr, val/ssim |
    | fid fid_num_* kid* precision recall *_score*         | eval/<key>                    |
    | conditional_accuracy classifier_test_accuracy        | eval/<key>                    |
    | psnr ssim lpips rfid sharpness* (mse in an evaluation run) | eval/<key>             |
    | eval_num_samples                                    | eval/num_samples              |
    | samples (the sample grid's image key)               | eval/samples                  |
    | <anything>_seconds                                  | time/<key>                    |
    | best_<metric>, steps_trained, num_trials            | sweep/<key>                   |
    | config.<field> (a PBT trial's current value)        | config/<field>                |
    """
    if "/" in key:
        return key
    if key in RENAMED:
        return RENAMED[key]
    if key.endswith("_seconds"):
        return f"time/{key}"
    if key.startswith("config."):
        return f"config/{key.removeprefix('config.')}"
    if kind == "evaluation" or key in EVAL_KEYS:
        return f"eval/{key}"
    if key in TRAIN_KEYS:
        return f"train/{key}"
    if key in SWEEP_KEYS or key.startswith("best_"):
        return f"sweep/{key}"
    return key


# -- the store and the source ----------------------------------------------------------------------

def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in the working directory (absolute, so Ray
    workers and subprocesses with another cwd write to the same store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer."""


def open_store_in_background(uri: str | None = None) -> threading.Thread:
    """Opens the tracking store on a thread while the driver does something else (starts Ray). A
    new SQLite store creates and migrates its tables when first opened: 1.6-2.1 s of a quickstart on
    the 2-core development machine (BENCHMARKS.md, "Start-up"). MLflow keeps the opened store for
    the process, so the run's own client finds it ready. Best effort: a store that fails here fails
    again, with its own error, when the run is created. Join the thread before any other use of
    the store: two threads creating one SQLite store would race."""

    def open_store() -> None:
        try:
            MlflowClient(tracking_uri=uri or tracking_uri()).search_experiments(max_results=1)
        except Exception:  # any failure: the run's own first call reports it
            pass

    thread = threading.Thread(target=open_store, name="mlflow-store")
    thread.start()
    return thread


def check_server(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail now, naming the server, when an http(s) tracking URI does not answer /health: MLflow's
    own client would retry each call for minutes before saying so. Other stores pass."""
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answers (a server without /health, or one behind authentication)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailable(f"MLflow tracking server {redact_uri(uri)} ($MLFLOW_TRACKING_URI) does not "
                                  f"answer ({reason}): start it, or unset MLFLOW_TRACKING_URI to track in ./mlflow.db"
                                  ) from None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: `mlartifacts/<experiment>`
    beside the database file, so a run's figures and spec sit with the store that names them
    (MLflow's own default is ./mlruns in whatever the working directory happens to be). None for
    any other store: a tracking server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)  # a collision is harmless: runs have own ids
    return (Path(database).resolve().parent / "mlartifacts" / folder).as_uri()


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


def git_remote(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "remote", "get-url", "origin"], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


# The ditlab command a run comes from, by its `ditlab.kind`, when the process is not the `ditlab`
# console script itself (the Python API, tests).
COMMAND_OF_KIND = {"train": "run", "evaluation": "evaluate", "sweep": "tune", "trial": "tune"}


def source_tags(kind: str) -> dict[str, str]:
    """The tags behind the runs table's Source, Version and User columns: `ditlab <command>` as a
    LOCAL source, the git commit (and the remote, which MLflow links for GitHub and GitLab)."""
    argv = sys.argv if sys.argv and sys.argv[0] else [""]
    command = argv[1] if Path(argv[0]).name == "ditlab" and len(argv) > 1 else COMMAND_OF_KIND.get(kind, "run")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {"mlflow.source.name": f"ditlab {command}", "mlflow.source.type": "LOCAL", "mlflow.user": user}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["ditlab.git_dirty"] = str(git_dirty())
        remote = git_remote()
        if remote:
            tags["mlflow.source.git.repoURL"] = redact_uri(remote)  # an https remote may hold a token
    elif os.environ.get("DITLAB_GIT_COMMIT"):  # a Ray Job's unpacked folder: `ditlab submit` recorded it
        tags["mlflow.source.git.commit"] = os.environ["DITLAB_GIT_COMMIT"]
        tags["ditlab.git_dirty"] = os.environ.get("DITLAB_GIT_DIRTY", "None")
    return tags


# -- the data version -----------------------------------------------------------------------------

def dataset_record(data_spec) -> dict[str, str]:
    """The MLflow dataset of a spec's data section: name, digest, source, profile. The digest is
    the data version: DVC's hash of the data folder when DVC tracks it (as in the tag
    `ditlab.data.dvc_md5`), else the start of the sha256 of its manifest (`ditlab.data.sha256`),
    else, for the embedded digits, of the scikit-learn file they are read from."""
    from ditlab.atomic import file_digest
    from ditlab.orchestration.versioning import data_tags

    tags = data_tags(data_spec)
    profile = {k: getattr(data_spec, k) for k in ("resolution", "channels", "test_fraction", "split_seed")}
    if "ditlab.data.path" in tags:
        path = Path(tags["ditlab.data.path"]).resolve()
        md5 = tags.get("ditlab.data.dvc_md5", "untracked")
        if md5 != "untracked":
            digest = md5
        elif "ditlab.data.sha256" in tags:
            digest = tags["ditlab.data.sha256"][:16]
        else:
            digest = "untracked"
        source_type, source = "local", {"uri": str(path)}
        if data_spec.prepared:
            profile["prepared"] = str(path)
    else:
        try:
            import sklearn.datasets

            path = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
            digest = file_digest(path)[:16]
        except (ImportError, OSError):
            path, digest = None, "unknown"
        source_type = "local"
        source = {"uri": str(path) if path else "sklearn.datasets.load_digits"}
    return {"name": tags["ditlab.data.name"], "digest": digest[:36], "source_type": source_type,
            "source": json.dumps(source), "profile": json.dumps(profile)}


def experiment_of_run(run_id: str) -> str:
    """The name of the experiment holding `run_id`."""
    client = MlflowClient(tracking_uri=tracking_uri())
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


# How ditlab starts and tells users to start an MLflow dashboard: without MLflow 3's job-execution
# back end, 8 processes for MLflow's GenAI jobs (which ditlab never submits) that took 13-24 CPU
# seconds as they started and held 1.3 GB (benchmarks/dashboard_cost.py).
DASHBOARD_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class Tracker:
    """One MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, uri: str, kind: str = "train"):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.uri = redact_uri(uri)  # what is shown and stored; the client connects with the full URI
        self.kind = kind  # the run's ditlab.kind: train, evaluation, sweep or trial (names its metrics)

    @classmethod
    def create(cls, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
        """A new run in `experiment` (created with the runs-table tag if missing), with the source
        tags (`ditlab <command>`, the git commit of the working directory, the user) and
        `ditlab.kind` (default `train`; `trial` for a run nested under a sweep)."""
        uri = tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment, artifact_location(uri, experiment),
                                                     tags=EXPERIMENT_KIND_TAG)
        else:
            experiment_id = found.experiment_id
            if found.tags.get("mlflow.experimentKind") is None:
                client.set_experiment_tag(experiment_id, *next(iter(EXPERIMENT_KIND_TAG.items())))
        tags = dict(tags or {})
        kind = tags.setdefault("ditlab.kind", "trial" if "ditlab.trial_id" in tags else "train")
        run = client.create_run(experiment_id, run_name=run_name, tags={**source_tags(kind), **tags})
        return cls(client, run.info.run_id, experiment_id, uri, kind)

    @classmethod
    def start(cls, spec: ExperimentSpec, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
        """A training run: every spec field as a param, the resolved spec as spec.yaml, the data
        as the run's dataset input."""
        tags = {"ditlab.spec_name": spec.name, "ditlab.data_source": spec.data.source, **(tags or {})}
        tracker = cls.create(spec.tracking.experiment, run_name, tags)
        tracker.log_params(flatten(spec.to_dict()))
        tracker.client.log_text(tracker.run_id, spec.to_yaml(), "spec.yaml")
        tracker.log_dataset(spec.data, context="training")
        return tracker

    @classmethod
    def resume(cls, run_id: str) -> Tracker:
        """Reopen an existing run (a `ditlab run --name` that continues an interrupted run)."""
        uri = tracking_uri()
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id, run.info.experiment_id, uri, run.data.tags.get("ditlab.kind", "train"))

    def last_step(self) -> int:
        """The highest step of any training or validation metric this run has (0: none yet)."""
        keys = [k for k in self.client.get_run(self.run_id).data.metrics if k.startswith(("train/", "val/"))]
        return max((m.step for k in keys for m in self.client.get_metric_history(self.run_id, k)), default=0)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Raw keys in, grouped MLflow names out (`mlflow_metric_name`)."""
        from mlflow.entities import Metric

        ts = int(mlflow.utils.time.get_current_time_millis())
        batch = [Metric(mlflow_metric_name(k, self.kind), float(v), ts, int(step or 0)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_dataset(self, data_spec, context: str = "training") -> None:
        """The data section as the run's dataset input: the runs table's Dataset column shows
        its name and digest (the data version), the run page its source and profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        record = dataset_record(data_spec)
        dataset = Dataset(record["name"], record["digest"], record["source_type"], record["source"],
                          profile=record["profile"])
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])

    def log_image(self, path: str | Path, key: str = "samples", step: int | None = None) -> None:
        """An image file as an image chart at `step`, named like a metric (`samples` ->
        `eval/samples`): the run's Model metrics show it in that section, with a step slider when
        there are several. Stored under the run's `images/` artifacts."""
        from PIL import Image

        with Image.open(path) as img:
            self.client.log_image(self.run_id, img.convert("RGB"), key=mlflow_metric_name(key, self.kind),
                                  step=int(step or 0), synchronous=True)

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
        """Where to look at this run: the dashboard URL, or the command that opens one. The query
        puts the 3.x dashboard in its model-training view (else its GenAI view's menus)."""
        view = "?workflowType=machine_learning"
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}{view}"
        env = " ".join(f"{name}={value}" for name, value in DASHBOARD_ENV.items())
        return f"{env} mlflow ui --backend-store-uri {self.uri}  (then #/experiments/{self.experiment_id}/runs{view})"
