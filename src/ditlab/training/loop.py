"""The training loop, written once for every task: plain PyTorch, no Ray, no MLflow.

    setup -> (train_step -> maybe_validate -> report or maybe_checkpoint) until the last step

What differs between kinds of experiment lives in a Task (training/tasks/); the loop owns the rest:
the batch each rank draws, the learning-rate schedule, EMA, report windows, non-finite steps,
checkpoint cadence and timing.

A step whose gradients are NaN or infinite (a bad batch, an overflow: a non-finite loss makes them
so as it backpropagates) is skipped, not fatal: every optimizer step of the task is guarded
(`FiniteStepGuard`), and under DDP the ranks agree on the decision (one rank stepping while another
skips would split the weights): from the gradients DDP averaged, which every rank holds alike, or
else through an all-reduced flag. A step counts as skipped when the guard skipped one of its
optimizer steps, so the ranks agree on that too without a collective of their own; a non-finite loss
whose gradients stay finite (a term with weight 0) is stepped, and reported as it is. Skipped steps
are counted (`skipped_steps` in the reports, from the first one on); `train.max_bad_steps` of them in
a row stop the run with TrainingDiverged, before anything from the bad steps is checkpointed.

Randomness is a function of the step: each rank's batch comes from a per-epoch permutation split
across ranks (DistributedSampler's contract; a streamed shard set, data/streaming.py, from a seeded
block shuffle its ranks resume by skipping), and the noise, timesteps and dropout of step n come
from a generator seeded by (seed, rank, n). Step n is the same whether the run got there in one go
or was interrupted and resumed, which is what makes resume exact.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ditlab.config import ExperimentSpec
from ditlab.data import ImageDataset
from ditlab.data.shards import read_manifest
from ditlab.data.streaming import StreamBatches
from ditlab.training.checkpoint import BUNDLE_NAME, capture_rng_state, load_bundle, restore_rng_state, save_bundle
from ditlab.training.ema import EMA
from ditlab.training.faults import maybe_exit, pace, poison_batch
from ditlab.training.precision import matmul_precision
from ditlab.training.reporter import Reporter
from ditlab.training.tasks import Batch, Task, task_class


@dataclass
class Placement:
    """Where this process sits in the job; the orchestrator fills it in."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Wraps the model for data parallelism (Ray Train's prepare_model -> DDP); identity alone.
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m
    # This rank's share of a shard set's stream (Ray Train's get_dataset_shard) when the spec streams
    # (data.format shards); None: the train split is held in memory.
    stream: Any = None


class TrainingDiverged(RuntimeError):
    """`train.max_bad_steps` steps in a row had a NaN or infinite loss or gradient."""


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (a collective: every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    failed = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(failed)
    return failed.item() == 0


def grads_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every element of every gradient is finite: one sum per gradient, as NaN and +-inf
    carry through a sum (a sum past float32's 3e38 counts as non-finite too). It reads each gradient
    once; `torch.isfinite(g).all()` per gradient gave the same verdict about 6 ms later per step at the
    quickstart's size, 3% of its step (BENCHMARKS.md, "The NaN guard")."""
    if not grads:
        return True
    return bool(torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum().isfinite())


class FiniteStepGuard:
    """Skips an optimizer's step when any of its gradients is NaN or infinite on any rank.

    `cover` wraps the `step` of each optimizer it has not seen yet (as torch's LR schedulers wrap
    it), so the tasks keep calling `optimizer.step()` and a bad gradient never reaches the weights;
    an optimizer a task creates later (a new phase) is covered at the next step.

    The ranks must agree. When DDP averaged every gradient an optimizer holds (`distributed` names
    each DDP-wrapped module), every rank holds the same gradients, a NaN on one rank included, and
    reaches the same verdict alone. An optimizer with any parameter outside DDP all-reduces its
    verdict, a collective per step; which optimizers do is fixed by the model, so every rank makes
    the same calls."""

    def __init__(self, device: torch.device):
        self.device, self.skipped = device, 0
        self._covered: set[int] = set()
        self._averaged: set[int] = set()  # ids of the parameters whose gradients DDP averages

    def distributed(self, wrapped: nn.Module) -> nn.Module:
        """Note the parameters `wrapped` averages, if it is DDP (wrap_model's result); returns it."""
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            ignored = getattr(wrapped, "parameters_to_ignore", set())
            self._averaged.update(id(p) for name, p in wrapped.module.named_parameters()
                                  if p.requires_grad and name not in ignored)
        return wrapped

    def cover(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for optimizer in optimizers:
            if id(optimizer) not in self._covered:
                self._covered.add(id(optimizer))
                optimizer.step = self._guarded(optimizer, optimizer.step)

    def _guarded(self, optimizer: torch.optim.Optimizer, step: Callable) -> Callable:
        def guarded_step(*args, **kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            finite = grads_finite([p.grad for p in params if p.grad is not None])
            if not all(id(p) in self._averaged for p in params):
                finite = all_ranks(finite, self.device)
            if finite:
                return step(*args, **kwargs)
            self.skipped += 1
            return None

        return guarded_step


class ShardSampler:
    """Which images each rank trains on at each step, as DistributedSampler shards an epoch.

    Every rank draws the same permutation of the dataset for an epoch (seeded by seed and epoch),
    pads it to a multiple of world_size by repeating its head, and takes every world_size-th index
    from its rank on: the ranks see disjoint images, and together the whole dataset once an epoch.
    Step k of the epoch takes the k-th run of `local_batch` indices of that shard (a shard smaller
    than the batch is tiled; the tail that does not fill a batch is dropped)."""

    def __init__(self, num_images: int, local_batch: int, seed: int, rank: int, world_size: int):
        self.num_images, self.local_batch, self.seed = num_images, local_batch, seed
        self.rank, self.world_size = rank, world_size
        per_rank = math.ceil(num_images / world_size)
        self.shard_size = per_rank * math.ceil(local_batch / per_rank)
        self.steps_per_epoch = self.shard_size // local_batch
        self._epoch, self._shard = -1, torch.empty(0, dtype=torch.long)

    def shard(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_images, generator=g)
            padded = order.repeat(math.ceil(self.shard_size * self.world_size / self.num_images))
            self._epoch, self._shard = epoch, padded[self.rank :: self.world_size][: self.shard_size]
        return self._shard

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.shard(epoch)[k * self.local_batch : (k + 1) * self.local_batch]


class MemoryBatches:
    """The in-memory path: a dataset held whole, each rank's step drawn by a ShardSampler."""

    def __init__(self, dataset: ImageDataset, sampler: ShardSampler):
        self.dataset, self.sampler = dataset, sampler

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, labels, positions in the split) of this rank's share of `step`."""
        indices = self.sampler.indices(step)
        return (*self.dataset.batch(indices), indices)


@dataclass
class TrainState:
    spec: ExperimentSpec
    task: Task
    ema: EMA
    source: MemoryBatches | StreamBatches  # this rank's batches, step by step
    guard: FiniteStepGuard
    step: int = 0
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run
    bad_streak: int = 0  # of them, how many in a row up to now
    # The reports since the checkpoint before the last one, kept in each bundle: see `replay_reports`.
    recent_reports: list[dict[str, float]] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        """The unwrapped module: what EMA tracks and checkpoints hold."""
        return self.task.model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A generator owned by one (rank, step) pair: resumable without saving generator state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def global_seed(seed: int, rank: int, step: int) -> int:
    """The global RNG's seed for one (rank, step), distinct from the step generator's."""
    return (seed * 1_000_003 + step) * 1_009 + rank + 2**40


def lr_at(step: int, train) -> float:
    """Linear warmup to `lr`, then constant or cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    span = max(train.steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / span, 1.0)
    floor = train.lr * train.min_lr_ratio
    return floor + 0.5 * (train.lr - floor) * (1 + math.cos(math.pi * progress))


def setup(spec: ExperimentSpec, placement: Placement, resume_from: str | None = None) -> TrainState:
    seed_everything(spec.seed + placement.rank)
    kind = task_class(spec.task)
    if placement.stream is None:
        dataset, manifest = kind.training_data(spec), None
        num_classes = dataset.num_classes
    else:  # what the loop needs of a streamed set, without reading a shard: its manifest, read once
        dataset, manifest = None, read_manifest(kind.stream_location(spec))
        num_classes = int(manifest["num_classes"])
    task = kind(spec, num_classes, placement.device)
    bundle = load_bundle(resume_from) if resume_from is not None else None
    if bundle is not None:
        task.model.load_state_dict(bundle["model"])
        task.optimizer.load_state_dict(bundle["optimizer"])
        task.load_extra_state(bundle.get("task_state", {}))  # absent in bundles older than tasks
    # Wrap after loading: DDP broadcasts rank 0's weights at construction. The EMA copy comes after
    # that, so every rank's EMA starts from the same weights.
    guard = FiniteStepGuard(placement.device)
    task.wrap(lambda module: guard.distributed(placement.wrap_model(module)))
    ema = EMA(task.model, spec.train.ema_decay, spec.train.ema_warmup)
    source = batch_source(spec, placement, dataset, bundle, manifest)
    state = TrainState(spec, task, ema, source, guard)
    if bundle is not None:
        ema.load_state_dict(bundle["ema"])
        restore_rng_state(bundle["rng"])
        state.step = int(bundle["step"])
        state.skipped_steps = int(bundle.get("skipped_steps", 0))  # absent in older bundles
        state.recent_reports = list(bundle.get("reports", []))
    return state


def batch_source(spec: ExperimentSpec, placement: Placement, dataset: ImageDataset | None,
                 bundle: dict | None, manifest: dict | None = None) -> MemoryBatches | StreamBatches:
    """The dataset held in memory, or this rank's stream (of the shard set `manifest` describes)
    positioned at the step resumed from."""
    local_batch = spec.train.batch_size // placement.world_size
    if dataset is not None:
        return MemoryBatches(dataset, ShardSampler(len(dataset), local_batch, spec.seed, placement.rank,
                                                   placement.world_size))
    return StreamBatches(placement.stream, local_batch, manifest, int(bundle["step"]) if bundle is not None else 0,
                         spec.data.prefetch_batches)


def make_bundle(state: TrainState) -> dict:
    return {
        "step": state.step,
        "model": state.task.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.task.optimizer.state_dict(),
        "task_state": state.task.extra_state(),
        "skipped_steps": state.skipped_steps,
        "reports": state.recent_reports,
        "rng": capture_rng_state(),
        "spec": state.spec.to_dict(),
        "model_config": state.task.model_config(),
    }


def train_step(state: TrainState, placement: Placement) -> dict[str, float] | None:
    """One optimizer step of the task on this rank's share of the global batch; None when the step
    was skipped for a non-finite loss or gradient (on any rank)."""
    state.task.before_step(state.step, state.ema)
    state.guard.cover(state.task.optimizers())
    images, labels, indices = state.source.batch(state.step)
    images = poison_batch(images, placement.rank, state.step + 1)
    batch = Batch(images.to(placement.device), labels.to(placement.device), indices)
    scheduled = lr_at(state.step, state.spec.train)
    for optimizer in state.task.optimizers():
        for group in optimizer.param_groups:
            group["lr"] = state.task.learning_rate(optimizer, scheduled)
    lr = state.task.learning_rate(state.task.optimizer, scheduled)
    state.task.set_train_mode()
    # Modules that draw from the global RNG (dropout) get it seeded by (seed, rank, step) too: a
    # checkpoint holds rank 0's RNG state only, so no other rank could resume its own.
    torch.manual_seed(global_seed(state.spec.seed, placement.rank, state.step))
    skipped_before = state.guard.skipped
    with matmul_precision(state.spec.train.matmul_precision, placement.device):
        metrics = state.task.step(batch, step_generator(state.spec.seed, placement.rank, state.step))
    state.step += 1
    # The guard's verdict is every rank's (module docstring): no collective here. Dropping the all-reduce
    # of each rank's loss verdict, with the shared-memory sum's single pass, gave the quickstart's two
    # ranks 1.033x their images/s (BENCHMARKS.md, "Ray's own processes, and the loss check").
    if state.guard.skipped == skipped_before:
        state.ema.update(state.task.model)
        state.bad_streak = 0
        return {**metrics, "lr": lr}
    state.skipped_steps += 1
    state.bad_streak += 1
    if state.bad_streak >= state.spec.train.max_bad_steps:
        raise TrainingDiverged(f"training loss is {metrics['loss']} at step {state.step}: {state.bad_streak} steps "
                               f"in a row had a NaN or infinite loss or gradient (train.max_bad_steps="
                               f"{state.spec.train.max_bad_steps}); the last checkpoint holds the weights "
                               "before them")
    return None


def window_means(window: list[dict[str, float]], device: torch.device) -> dict[str, float]:
    """The report window's figures, averaged over its (not skipped) steps and the ranks. Every rank
    skips the same steps, so every rank's window has the same keys (a window of skipped steps
    only has none)."""
    if not window:
        return {}
    return mean_across_ranks({k: float(np.mean([w[k] for w in window])) for k in window[0]}, device)


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


def maybe_checkpoint(state: TrainState, placement: Placement, reporter: Reporter, metrics: dict, force: bool) -> bool:
    """At checkpoint steps every rank reports; rank 0 attaches the bundle."""
    if not (force or state.step % state.spec.train.checkpoint_every == 0):
        return False
    if placement.rank != 0:
        reporter.report(metrics, None, checkpoint_step=True)
        return True
    with tempfile.TemporaryDirectory(prefix="ditlab-ckpt-") as tmp:
        save_bundle(f"{tmp}/{BUNDLE_NAME}", make_bundle(state))
        reporter.report(metrics, tmp, checkpoint_step=True)
    return True


def is_validation_step(state: TrainState) -> bool:
    every = state.spec.train.val_every or state.spec.train.log_every
    return state.task.validates and (state.step % every == 0 or state.step == state.spec.train.steps)


def val_weights(state: TrainState) -> nn.Module:
    """The weights `train.val_weights` names: the EMA copy or the live model."""
    return state.ema.model if state.spec.train.val_weights == "ema" else state.task.model


def maybe_validate(state: TrainState) -> dict[str, float]:
    """The task's validation figures at validation steps, on the weights `train.val_weights` names."""
    if not is_validation_step(state):
        return {}
    return state.task.validation(val_weights(state))


def is_sample_eval_step(state: TrainState) -> bool:
    every = state.spec.train.eval_every
    return every is not None and (state.step % every == 0 or state.step == state.spec.train.steps)


def maybe_score_samples(state: TrainState) -> dict[str, float]:
    """The task's sample quality (FID, KID) at `train.eval_every` steps, on the same weights."""
    return state.task.sample_quality(val_weights(state)) if is_sample_eval_step(state) else {}


def is_report_step(state: TrainState) -> bool:
    train = state.spec.train
    return (state.step % train.log_every == 0 or state.step % train.checkpoint_every == 0
            or state.step == train.steps or is_validation_step(state) or is_sample_eval_step(state))


def report(state: TrainState, placement: Placement, reporter: Reporter, window: list[dict[str, float]],
           images_per_sec: float) -> None:
    """The window's figures (and validation, sample quality, a checkpoint when due) to the reporter."""
    metrics = window_means(window, placement.device)
    metrics.update(step=state.step, images_per_sec=images_per_sec,
                   epoch=state.step * state.spec.train.batch_size / len(state.source))
    if state.skipped_steps:  # reported from the first skipped step on
        metrics["skipped_steps"] = state.skipped_steps
    metrics.update(maybe_validate(state))  # after the clock: not counted as training time
    metrics.update(maybe_score_samples(state))
    state.recent_reports.append({k: int(v) if k == "step" else float(v) for k, v in metrics.items()})  # plain data
    if maybe_checkpoint(state, placement, reporter, metrics, force=state.step == state.spec.train.steps):
        checkpoints = [r["step"] for r in state.recent_reports if r["step"] % state.spec.train.checkpoint_every == 0]
        older = checkpoints[-2] if len(checkpoints) >= 2 else 0
        state.recent_reports = [r for r in state.recent_reports if r["step"] > older]
    else:
        reporter.report(metrics, None)


def replay_reports(state: TrainState, reporter: Reporter) -> None:
    """On a resume, report again what was reported since the checkpoint before the one resumed
    from. A driver killed between Ray Train recording a checkpoint and logging the reports up to it
    would otherwise lose those reports for good: training resumes after them. Only for reporters
    that ask (`replays_reports`, Ray Train's: its driver drops the steps it already logged)."""
    if getattr(reporter, "replays_reports", False):
        for metrics in state.recent_reports:
            reporter.report(dict(metrics), None)


def train(spec: ExperimentSpec, reporter: Reporter, placement: Placement | None = None,
          resume_from: str | None = None) -> TrainState:
    """Run (or continue) training to `spec.train.steps`, reporting every `log_every` steps (the
    window's mean across steps and ranks), validation figures every `val_every` steps (default:
    log_every), sample quality every `eval_every` steps (default: never), a checkpoint every
    `checkpoint_every` steps, and all of them at the end."""
    placement = placement or Placement()
    state = setup(spec, placement, resume_from)
    replay_reports(state, reporter)
    window: list[dict[str, float]] = []
    tic, images = time.perf_counter(), 0
    while state.step < spec.train.steps:
        if (figures := train_step(state, placement)) is not None:
            window.append(figures)
        images += spec.train.batch_size
        if is_report_step(state):
            report(state, placement, reporter, window, images / max(time.perf_counter() - tic, 1e-9))
            window, tic, images = [], time.perf_counter(), 0
        maybe_exit(placement.rank, state.step)  # fault injection (training/faults.py): off in real runs
        pace()
    if spec.train.steps == 0:  # an untrained baseline still gets a checkpoint to sample from
        maybe_checkpoint(state, placement, reporter, {"step": 0}, force=True)
    return state
