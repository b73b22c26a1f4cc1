"""The one place a Ray Train TorchTrainer is built, for `ditlab run`, `ditlab train` and every Tune
trial: the worker function, its Reporter, the scaling and run configs. Whatever the task, the
worker runs the same loop (training/loop.py); the spec names the task."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import ray
import ray.data
import ray.train
import torch
from ray.data import ExecutionOptions
from ray.train import (Checkpoint, CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig)
from ray.train.torch import TorchTrainer

from ditlab.config import ExperimentSpec, from_dict
from ditlab.data.shards import handed_filesystems, read_manifest, use_filesystems
from ditlab.data.streaming import ReadShard, shard_reads
from ditlab.orchestration.console import quiet_train_worker, train_log_level, verbose_requested
from ditlab.orchestration.remote import train_worker
from ditlab.training.checkpoint import checkpoint_dirs
from ditlab.training.faults import fault_environment
from ditlab.training.host_allreduce import share_gradients
from ditlab.training.loop import Placement, train
from ditlab.training.tasks import task_class


class RayReporter:
    """The training loop's Reporter under Ray Train: every rank reports, rank 0 with the bundle.
    A resumed loop reports the steps before its checkpoint again (training/loop.py, replay_reports):
    the driver logs the ones it missed and drops the others.

    With a `relay` (the driver's metrics queue, for `ditlab run` and `ditlab train`), rank 0 puts
    every report's metrics in it, and only checkpoint steps go through `ray.train.report`. Ray
    Train's controller takes each worker's reports when it polls the workers, every 2 s, and holds
    one unread report per worker: a loop that reported every 1.4 s, as the quickstart's does, waited
    at each report for the next poll (BENCHMARKS.md, "Reports that wait for Ray Train's poll").
    Without one (Tune trials: Tune takes the reports from Ray Train), every report goes to Ray Train."""

    replays_reports = True

    def __init__(self, relay=None, rank: int = 0):
        self.relay, self.rank = relay, rank

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None, *,
               checkpoint_step: bool = False) -> None:
        if self.relay is not None:
            if self.rank == 0:
                self.relay.put(dict(metrics))  # returns once the driver's queue holds it
            if not checkpoint_step:
                return
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=f"checkpoint_{int(metrics['step']):06d}")


def run_worker(config: dict) -> None:
    """What each Ray Train worker runs (through remote.train_worker): the loop, resumed from the run's
    latest checkpoint if any."""
    # A worker process of its own: the driver's console settings do not reach it, so the driver's
    # --verbose choice travels in the config (a cluster's workers do not inherit its environment).
    quiet_train_worker(config.get("verbose"))
    os.environ.update(config.get("faults", {}))  # fault-injection hooks (training/faults.py): tests only
    use_filesystems(config.get("filesystems", {}))  # the driver's, for data on s3:// (the test split)
    spec = from_dict(config["spec"], "spec sent to worker")
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    ctx = ray.train.get_context()
    placement = Placement(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                          device=ray.train.torch.get_device(), wrap_model=wrap_for_ranks,
                          stream=ray.train.get_dataset_shard("train") if streams(spec) else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_folder") and checkpoint_dirs(config["resume_folder"]):
        # Ray Train's record was set aside with a corrupt checkpoint: the newest one left.
        checkpoint = Checkpoint.from_directory(str(checkpoint_dirs(config["resume_folder"])[-1]))
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
        train(spec, RayReporter(config.get("metrics_queue"), placement.rank), placement, resume_from=resume_dir)


def wrap_for_ranks(module: torch.nn.Module) -> torch.nn.Module:
    """Ray Train's DDP wrapping; where the ranks share one host's CPUs, gradients are then averaged
    through shared memory instead of gloo's TCP (training/host_allreduce.py)."""
    return share_gradients(ray.train.torch.prepare_model(module))


def worker_spec(spec: ExperimentSpec) -> dict:
    """The spec as workers get it: workers run in their own folder, so dataset paths are made
    absolute here (on a cluster they must name shared storage)."""
    raw = spec.to_dict()
    data = raw["data"]
    # With prepared data the images come from `prepared`; `path` then only identifies the source
    # (the prepared manifest records it as written), so it is left as it is.
    key = "prepared" if data.get("prepared") else "path" if data.get("path") else None
    if key and "://" not in data[key]:  # a URI (s3://) names shared storage already
        data[key] = str(Path(data[key]).resolve())
    latent = raw["latent"]
    if latent.get("autoencoder"):  # a latent spec's autoencoder checkpoint and its latent cache
        latent["autoencoder"] = str(Path(latent["autoencoder"]).resolve())
        latent["cache"] = str(Path(latent["cache"]).resolve())
    if raw["distillation"].get("teacher"):
        raw["distillation"]["teacher"] = str(Path(raw["distillation"]["teacher"]).resolve())
    return raw


def streams(spec: ExperimentSpec) -> bool:
    """Whether the run streams its train split from shards through Ray Data (data/streaming.py)."""
    return spec.data.format == "shards" and spec.data.stream


def stream_datasets(spec: ExperimentSpec) -> dict:
    """TorchTrainer's datasets and dataset_config for a streaming spec; none for the in-memory path."""
    if not streams(spec):
        return {}
    return {"datasets": {"train": training_stream(spec)},
            # Order preserved: the split then ignores locality and deals the same shards to the same
            # ranks in every execution, which is what makes a resumed stream repeat (data/streaming.py).
            "dataset_config": DataConfig(datasets_to_split=["train"],
                                         execution_options=ExecutionOptions(preserve_order=True))}


def training_stream(spec: ExperimentSpec) -> ray.data.Dataset:
    """The train split of a shard set (the task's: the data, or a latent spec's latent cache) as one
    Ray Dataset running through every epoch the run needs. Read tasks take no CPU slot (Ray Train's
    workers hold those, and a read is I/O bound); `data.read_parallelism` bounds how many run at once."""
    # Ray Data's progress bars and its "Starting execution" and "Execution plan" lines come from the
    # split coordinator, through log_to_driver, between our bar's updates (about 50 lines for a
    # short run): off unless --verbose. Ray Data then says once, as a warning, that its bars are off.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = verbose_requested()
    location = task_class(spec.task).stream_location(spec)
    entries = read_manifest(location)["shards"]["train"]
    rows = shard_reads(spec.train.steps, spec.train.batch_size, sum(e["count"] for e in entries), len(entries),
                       spec.resources.num_workers)
    return ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ReadShard(location, entries, spec.seed), batch_size=1, batch_format="numpy", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=spec.data.read_parallelism))


def build_trainer(spec: ExperimentSpec, *, name: str, storage: str | Path, callbacks: list,
                  checkpoints_kept: int = 2, resume_folder: str | Path | None = None,
                  storage_filesystem=None, metrics_queue=None) -> TorchTrainer:
    """A TorchTrainer for `spec` as the Ray Train run `name` under `storage`: rerunning the same
    name and storage resumes from its latest checkpoint (or, when Ray Train has no record of one,
    from the newest checkpoint folder in `resume_folder`). `callbacks` receive rank 0's reports
    that go through Ray Train: all of them, or with `metrics_queue` (a ray.util.queue.Queue, which
    then gets every report's metrics from rank 0) those at checkpoint steps (RayReporter).
    `storage_filesystem`: the pyarrow filesystem `storage` is a path on (object storage, storage.py)."""
    res = spec.resources
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": 1} if res.use_gpu else {})}
    return TorchTrainer(
        train_worker,  # by reference: remote.py says why it lives there
        train_loop_config={"spec": worker_spec(spec), "faults": fault_environment(), "verbose": verbose_requested(),
                           "filesystems": handed_filesystems(spec.data.path) if spec.data.path else {},
                           "resume_folder": str(resume_folder) if resume_folder else None,
                           "metrics_queue": metrics_queue},
        **stream_datasets(spec),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_kept),
            failure_config=FailureConfig(max_failures=res.max_failures),
            callbacks=callbacks,
            # Our progress bar shows each report; Ray Train's INFO lines would repeat them (--verbose: INFO).
            logging_config=LoggingConfig(log_level=train_log_level()),
        ),
    )
