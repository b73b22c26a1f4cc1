"""`ditlab run` and `ditlab train`: train a spec under Ray Train, then evaluate and track it in MLflow.

Driver side, here: the run folder, the MLflow run, the progress bar, the task's final evaluation.
Worker side: orchestration/trainer.py (the one TorchTrainer builder) runs the training loop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ditlab.atomic import atomic_path, write_json
from ditlab.config import ExperimentSpec, SpecError, flatten, from_dict
from ditlab.evaluation.plots import save_loss_curve, save_sample_grid
from ditlab.evaluation.suite import Report
from ditlab.orchestration.ray_session import ensure_ray, shutdown_in_background
from ditlab.orchestration.records import open_recorded_run
from ditlab.orchestration.remote import CheckpointSync
from ditlab.orchestration.tracking import Tracker, check_server, mlflow_metric_name, open_store_in_background
from ditlab.orchestration.trainer import build_trainer
from ditlab.orchestration.versioning import run_tags
from ditlab.storage import RunFolder, run_folder
from ditlab.training.checkpoint import BUNDLE_NAME, checkpoint_dirs, corrupt_checkpoints, load_bundle, set_aside
from ditlab.training.tasks import task_class


@dataclass
class MetricsConsumer:
    """Driver thread: reads relayed metrics, logs them to MLflow and drives the progress bar.

    Each step reaches MLflow once: after a restart from a checkpoint (a crashed worker, or this
    command rerun after the driver died) the workers report the steps since that checkpoint again,
    and reports at or below `last_step` (the MLflow run's highest step so far) are dropped. Reports
    MLflow refuses (its server down for longer than its client retries) are kept and sent with the
    next ones; `stop` tries them again for up to `flush_seconds`, then writes what is left to
    `spool` (the run folder's unsent_metrics.jsonl), which the rerun with --name sends first
    (`replay_unsent`)."""

    queue: Queue
    tracker: Tracker
    total_steps: int
    progress: bool
    last_step: int = 0
    spool: Path | None = None
    flush_seconds: float = 120
    history: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._consume, daemon=True)

    def start(self) -> MetricsConsumer:
        self._thread.start()
        return self

    def stop(self) -> None:
        try:
            self.queue.put(None)
        except Exception:  # noqa: BLE001  (the queue's actor is gone: its thread has ended)
            pass
        self._thread.join(timeout=60)
        deadline = time.monotonic() + self.flush_seconds
        while self.pending and not self._flush() and time.monotonic() < deadline:
            time.sleep(2)
        if self.pending:
            where = "they are lost"
            if self.spool is not None:
                earlier = self.spool.read_text() if self.spool.is_file() else ""
                with atomic_path(self.spool, fsync=True) as tmp:
                    tmp.write_text(earlier + "".join(json.dumps(item) + "\n" for item in self.pending))
                where = f"kept in {self.spool}: rerun the command with the same --name to send them"
            raise RuntimeError(f"the MLflow tracking server took none of {len(self.pending)} reports in "
                               f"{self.flush_seconds:.0f} s (steps {self.pending[0]['step']:.0f} to "
                               f"{self.pending[-1]['step']:.0f}); {where}")

    def _flush(self) -> bool:
        """Send the pending reports in step order; False (keeping the rest) when MLflow refuses."""
        while self.pending:
            item = self.pending[0]
            try:
                self.tracker.log_metrics({k: v for k, v in item.items() if k != "step"}, int(item["step"]))
            except Exception as err:  # MLflow raises several types for an unreachable server
                print(f"ditlab: warning: MLflow did not take step {int(item['step'])} ({type(err).__name__}); "
                      f"{len(self.pending)} reports kept to send later", file=sys.stderr)
                return False
            self.pending.pop(0)
        return True

    def _consume(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, desc="training", unit="step", disable=not self.progress)
        while (item := self.queue.get()) is not None:
            step = int(item["step"])
            if step <= self.last_step:  # a replay of a step logged before a restart
                continue
            self.last_step = step
            self.history.append(item)
            self.pending.append(item)
            self._flush()
            bar.update(max(step - bar.n, 0))
            bar.set_postfix(loss=f"{item.get('loss', float('nan')):.4f}", img_s=f"{item.get('images_per_sec', 0):.0f}")
        bar.close()


UNSENT = "unsent_metrics.jsonl"


def replay_unsent(run_dir: Path, tracker: Tracker) -> None:
    """Send the reports an earlier attempt could not (MetricsConsumer's spool), then remove it."""
    spool = run_dir / UNSENT
    if not spool.is_file():
        return
    items = [json.loads(line) for line in spool.read_text().splitlines() if line.strip()]
    for item in items:
        tracker.log_metrics({k: v for k, v in item.items() if k != "step"}, int(item["step"]))
    spool.unlink()
    print(f"sent {len(items)} reports an earlier attempt kept in {spool}", file=sys.stderr)


def open_tracker(spec: ExperimentSpec, run_dir: Path, location: str | None = None) -> Tracker:
    """A new MLflow run, or the one this run folder already had (resuming keeps one MLflow run).
    `location`: the run folder as its tag names it, when `run_dir` stages an s3:// one."""
    display_name = os.environ.get("DVC_EXP_NAME") or run_dir.name
    tags = {"ditlab.run_dir": location or str(run_dir)}
    tracker, _ = open_recorded_run(run_dir, lambda: Tracker.start(spec, display_name, tags=tags))
    return tracker


# Sections whose change makes a run folder's checkpoints belong to another experiment.
TRAINING_SECTIONS = ("task", "seed", "data", "model", "diffusion", "loss", "autoencoder", "latent", "train",
                     "restoration", "distillation")


class RunFolderError(ValueError):
    pass


def spec_changes(old: dict, new: dict) -> list[str]:
    """Dotted fields of the training sections that differ between two spec dicts. The old one is
    validated first, so a field added since it was written counts as its default."""
    try:
        old = from_dict(old, "recorded spec").to_dict()
    except SpecError:
        pass  # compare what is there: every differing field is named
    old_flat = flatten({k: old.get(k) for k in TRAINING_SECTIONS})
    new_flat = flatten({k: new.get(k) for k in TRAINING_SECTIONS})
    return sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))


def prepare_run_dir(spec: ExperimentSpec, run_dir: Path, restart_if_changed: bool,
                    skip_corrupt: bool = False, clear=shutil.rmtree) -> bool:
    """Before training into an existing run folder: resume only a run of the same spec, and only
    from checkpoints that pass their integrity check. With `restart_if_changed` (the DVC train
    stage, whose run folder persists between `dvc repro`s) a changed spec starts the run over.
    A corrupt checkpoint is an error naming it, unless `skip_corrupt`: then it is set aside (with
    Ray Train's record of the run's checkpoints, which names it) in <run>/corrupt/, a warning line
    says so, and True is returned: the workers resume from the newest checkpoint left. `clear(run_dir)`
    starts a run over (RunFolder.clear for an s3:// one, whose checkpoints are not in `run_dir`)."""
    saved = run_dir / "spec.yaml"
    if saved.is_file():
        changed = spec_changes(yaml.safe_load(saved.read_text()) or {}, spec.to_dict())
        if changed:
            if not restart_if_changed:
                raise RunFolderError(
                    f"run folder {str(run_dir)!r} holds a run of another spec ({', '.join(changed[:5])} differ); "
                    "choose another --name, or pass --restart-if-changed to start it over")
            print(f"spec changed ({', '.join(changed[:5])}): starting {run_dir} over", file=sys.stderr)
            clear(run_dir)
    folders = checkpoint_dirs(run_dir) if run_dir.is_dir() else []
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if snapshot.is_file() and not folders:
        raise RunFolderError(f"run folder {str(run_dir)!r} records checkpoints but holds none (a missing cache? "
                             "try `dvc checkout` or `dvc pull`); delete the folder to start over")
    corrupt = corrupt_checkpoints(run_dir) if folders else []
    if not corrupt:
        return False
    good = [f for f in folders if f not in {c for c, _ in corrupt}]
    fallback = f"resume from {good[-1].name}" if good else "start over"
    if not skip_corrupt:
        raise RunFolderError(f"{corrupt[-1][1]}; pass --skip-corrupt-checkpoints to set it aside and {fallback}")
    moved = set_aside(run_dir, [c for c, _ in corrupt], [snapshot] if snapshot.is_file() else [])
    for _, reason in corrupt:
        print(f"ditlab: warning: {reason.split(';')[0]}: moved to {moved}; {fallback}", file=sys.stderr)
    return True


def run_experiment(spec: ExperimentSpec, *, address: str | None = None, storage_path: str | Path = "runs",
                   run_name: str | None = None, progress: bool = True, evaluate: bool = True,
                   restart_if_changed: bool = False, export_dir: str | Path | None = None,
                   skip_corrupt_checkpoints: bool = False) -> dict:
    """Train, evaluate (unless `evaluate` is False), track. Returns the summary also written to
    <run dir>/result.json; `export_dir` gets a copy of the run's metrics, history and loss curve
    (the DVC train stage's metrics and plots). A tracking server that does not answer is an error
    before anything starts; a corrupt checkpoint one too, unless `skip_corrupt_checkpoints`.
    `storage_path` may be an s3:// URL (ditlab/storage.py)."""
    run_name = run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_server()
    with run_folder(storage_path, run_name) as folder:
        return run_in_folder(spec, folder, address, progress, evaluate, restart_if_changed, export_dir,
                             skip_corrupt_checkpoints)


def run_in_folder(spec: ExperimentSpec, folder: RunFolder, address: str | None, progress: bool, evaluate: bool,
                  restart_if_changed: bool, export_dir: str | Path | None, skip_corrupt_checkpoints: bool) -> dict:
    """run_experiment's work in its run folder (`folder.local`, the staging folder of an s3:// one)."""
    run_dir = folder.local
    set_aside_corrupt = run_dir.is_dir() and prepare_run_dir(spec, run_dir, restart_if_changed,
                                                             skip_corrupt_checkpoints, clear=lambda _: folder.clear())
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "spec.yaml") as tmp:
        tmp.write_text(spec.to_yaml())
    trained = trained_checkpoint(run_dir, spec.train.steps)
    started_ray = False
    if trained is None:
        opening_store = open_store_in_background()  # while Ray starts
        try:
            started_ray = ensure_ray(address)
        finally:  # never leave a new store half created
            opening_store.join()
    stopping_ray = None
    tracker = open_tracker(spec, run_dir, folder.location)
    folder.push()  # a driver killed from here on is resumed into this MLflow run
    replay_unsent(run_dir, tracker)
    tracker.set_tags(run_tags(spec.data))
    try:
        if trained is None:
            checkpoint, history, timings = fit(spec, folder, tracker, progress,
                                               resume_folder=run_dir if set_aside_corrupt else None)
            if started_ray:  # what is left (evaluation, figures, MLflow) needs no Ray
                stopping_ray = shutdown_in_background()
        else:  # nothing left to train: no workers to start
            print(f"{run_dir} is already trained to step {spec.train.steps}: using {trained.name}", file=sys.stderr)
            checkpoint, history, timings = trained, [], {}
        summary = finish_run(spec, tracker, run_dir, checkpoint, history, timings, progress, evaluate)
    except BaseException as err:
        # Ctrl-C, or SIGTERM from a stopped Ray Job (ray.init's handler turns it into SystemExit).
        killed = isinstance(err, (KeyboardInterrupt, SystemExit))
        if not killed:  # why, on the run's page: the last line of a worker's error is its own message
            lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            tracker.set_tags({"ditlab.error": lines[-1].strip()[:1000]})
        tracker.end("KILLED" if killed else "FAILED")
        raise
    summary.update(run_dir=folder.location, checkpoint=folder.checkpoint_location(checkpoint.name))
    write_json(run_dir / "result.json", summary)
    tracker.log_artifact(run_dir / "result.json")
    tracker.end("FINISHED")
    if export_dir is not None:
        export_summary(run_dir, Path(export_dir))
    if stopping_ray is not None:  # after an error, a normal exit waits for the thread
        stopping_ray.join()
    return summary


def fit(spec: ExperimentSpec, folder: RunFolder, tracker: Tracker, progress: bool,
        resume_folder: Path | None = None) -> tuple[Path, list[dict], dict[str, float]]:
    """Train under Ray Train (resuming the run's latest checkpoint, if any; with `resume_folder`,
    the newest checkpoint folder there, Ray Train's record having been set aside), with rank 0's
    reports logged to MLflow (each step once) and shown on the progress bar.
    (final checkpoint folder, on this machine: copied from object storage if there, reports, timings)"""
    run_name = folder.local.name
    # The queue's actor on the driver's node: on a node that dies mid-run, the reports would die with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    consumer = MetricsConsumer(queue, tracker, spec.train.steps, progress, last_step=tracker.last_step(),
                               spool=folder.local / UNSENT).start()
    started = time.perf_counter()
    nodes = alive_nodes()
    try:
        storage, filesystem = folder.ray_storage()
        result = build_trainer(spec, name=run_name, storage=storage, storage_filesystem=filesystem,
                               callbacks=[CheckpointSync()], metrics_queue=queue,
                               resume_folder=resume_folder).fit()
    except Exception as err:
        # Ray declares a node dead some seconds after the surviving workers fail on it: wait that long
        # when the error looks like a lost peer (on a multi-node cluster), not after any failure.
        wait = 20 if len(nodes) > 1 and lost_peer_error(str(err)) else 0
        lost = node_lost(nodes, run_name, consumer.last_step, wait_seconds=wait)
        if lost is None:
            raise
        raise lost from err
    finally:
        consumer.stop()
    timings = {"train_seconds": time.perf_counter() - started}
    return local_checkpoint(result.checkpoint, folder), consumer.history, timings


def local_checkpoint(checkpoint: ray.train.Checkpoint, folder: RunFolder) -> Path:
    """The checkpoint's folder on this machine: a checkpoint on object storage is copied into the
    staging folder (for the final evaluation; not copied back, the original stays where it is)."""
    if folder.url is None:
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory(str(folder.local / Path(checkpoint.path).name)))


class NodeLost(RuntimeError):
    """A Ray node that held the run's workers left the cluster mid-run."""


def alive_nodes() -> dict[str, str]:
    """The cluster's alive nodes: id -> address."""
    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n["Alive"]}


# What a failure caused by a vanished node says: Ray's own words for a dead node or actor, or a
# surviving rank's gloo/NCCL error on the closed connection (it can arrive before Ray's).
LOST_PEER = re.compile(r"node|connection (closed|reset)|actor died|rpc_code: 14|unavailable|remote worker crash",
                       re.IGNORECASE)


def lost_peer_error(text: str) -> bool:
    return LOST_PEER.search(text) is not None


def node_lost(before: dict[str, str], run_name: str, step: int, wait_seconds: float) -> NodeLost | None:
    """When training failed: a NodeLost naming the nodes alive at its start that are gone now
    (waiting up to `wait_seconds` for the cluster to declare one dead), else None."""
    deadline = time.monotonic() + wait_seconds
    while not (lost := sorted(before.keys() - alive_nodes().keys())) and time.monotonic() < deadline:
        time.sleep(1)
    if not lost:
        return None
    names = ", ".join(f"{node} ({before[node]})" for node in lost)
    return NodeLost(f"Ray node {names} was lost during training (last step logged: {step}); the run's checkpoints "
                    f"are kept: rerun with --name {run_name} to resume once the cluster has the workers' resources "
                    "again, or set resources.max_failures to retry on the nodes left")


def trained_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """The run folder's checkpoint of its last step, when the run already got there."""
    folders = checkpoint_dirs(run_dir) if run_dir.is_dir() else []
    return folders[-1] if folders and folders[-1].name == f"checkpoint_{steps:06d}" else None


# The run's summary files; steps_comparison.png is a distillation run's (Report.plots).
EXPORTED = ("metrics.json", "history.json", "loss_curve.png", "steps_comparison.png")


def export_summary(run_dir: Path, export_dir: Path) -> None:
    """Copy the run's summary files (what DVC shows as metrics and plots) out of the run folder."""
    export_dir.mkdir(parents=True, exist_ok=True)
    for name in EXPORTED:
        if (run_dir / name).is_file():
            with atomic_path(export_dir / name) as tmp:
                shutil.copyfile(run_dir / name, tmp)


def finish_run(spec: ExperimentSpec, tracker: Tracker, run_dir: Path, checkpoint_dir: Path,
               history: list[dict], timings: dict[str, float], progress: bool, evaluate: bool = True) -> dict:
    """Final evaluation (optional), figures and the summary."""
    if evaluate:
        bundle_path = checkpoint_dir / BUNDLE_NAME
        evaluation = task_class(spec.task).evaluate_checkpoint(load_bundle(bundle_path), str(bundle_path),
                                                               spec.evaluation, progress=progress)
    else:
        evaluation = Report(figures={}, notes={}, settings={}, samples=None)
    metrics = {**evaluation.figures, **timings}
    history = [h for h in history if "loss" in h]  # a 0-step run reports only its checkpoint
    if history:
        metrics["final_loss"] = float(history[-1]["loss"])
        if "val_loss" in history[-1]:  # the loop validates at the last step
            metrics["final_val_loss"] = float(history[-1]["val_loss"])
    # The evaluation's figures are named as in an evaluation run (an autoencoder's `mse` is eval/mse,
    # not the training loss term train/mse); final_loss and final_val_loss as training figures.
    tracker.log_metrics({mlflow_metric_name(k, "evaluation"): v for k, v in evaluation.figures.items()},
                        spec.train.steps)
    tracker.log_metrics({k: v for k, v in metrics.items() if k not in evaluation.figures}, spec.train.steps)
    tracker.set_tags({f"ditlab.eval.{k}": v for k, v in evaluation.notes.items()})
    if history:
        tracker.log_artifact(save_loss_curve(history, run_dir / "loss_curve.png"), "figures")
        write_json(run_dir / "history.json", {"history": history})
    if evaluation.samples is not None and len(evaluation.samples):
        grid = save_sample_grid(evaluation.samples, run_dir / "samples.png", title=evaluation.title,
                                nrow=evaluation.grid_columns)
        tracker.log_artifact(grid, "figures")
        tracker.log_image(grid, "samples", spec.train.steps)  # the dashboard's image chart (eval/samples)
    for name, write in evaluation.plots.items():
        tracker.log_artifact(write(run_dir / f"{name}.png"), "figures")
    write_json(run_dir / "metrics.json", metrics)
    tracker.log_artifact(run_dir / "metrics.json")
    return {
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint_dir),
        "mlflow_run_id": tracker.run_id,
        "mlflow_experiment_id": tracker.experiment_id,
        "mlflow_tracking_uri": tracker.uri,
        "mlflow_url": tracker.url,
        "metrics": metrics,
        "notes": evaluation.notes,
    }
