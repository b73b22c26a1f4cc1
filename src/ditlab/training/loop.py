"""The training loop: plain PyTorch, no Ray, no MLflow. setup -> step -> maybe_log -> maybe_checkpoint.

Randomness is drawn per step from a generator seeded by (seed, rank, step): batch indices,
timesteps, noise and label dropout of step n are the same whether the run got there in one go
or was interrupted and resumed, which is what makes resume exact.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ditlab.config import ExperimentSpec
from ditlab.data import ImageDataset, load_dataset
from ditlab.diffusion import GaussianDiffusion, training_losses
from ditlab.models import DiT, build_model
from ditlab.training.checkpoint import BUNDLE_NAME, capture_rng_state, load_bundle, restore_rng_state, save_bundle
from ditlab.training.ema import EMA
from ditlab.training.reporter import Reporter
from ditlab.training.validation import ValidationSet, validation_loss, validation_set


@dataclass
class Placement:
    """Where this process sits in the job; the orchestrator fills it in."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Wraps the model for data parallelism (Ray Train's prepare_model -> DDP); identity alone.
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m


@dataclass
class TrainState:
    spec: ExperimentSpec
    model: DiT  # the unwrapped module: what EMA tracks and checkpoints hold
    wrapped: nn.Module  # what the forward pass goes through (DDP across ranks)
    ema: EMA
    optimizer: torch.optim.Optimizer
    diffusion: GaussianDiffusion
    dataset: ImageDataset
    step: int = 0
    validation: ValidationSet | None = None


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: every later step would be wasted compute."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A generator owned by one (rank, step) pair: resumable without saving generator state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


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


def build_diffusion(spec: ExperimentSpec) -> GaussianDiffusion:
    d = spec.diffusion
    return GaussianDiffusion.from_schedule(d.schedule, d.num_timesteps, d.prediction)


def build_model_for(spec: ExperimentSpec, num_classes: int) -> DiT:
    return build_model(
        spec.model.name,
        input_size=spec.data.resolution,
        in_channels=spec.data.channels,
        num_classes=num_classes,
        learn_sigma=spec.model.learn_sigma,
        class_dropout_prob=spec.model.class_dropout_prob,
        dropout=spec.model.dropout,
    )


def setup(spec: ExperimentSpec, placement: Placement, resume_from: str | None = None) -> TrainState:
    seed_everything(spec.seed + placement.rank)
    dataset = load_dataset(spec.data, "train")
    model = build_model_for(spec, dataset.num_classes).to(placement.device)
    ema = EMA(model, spec.train.ema_decay, spec.train.ema_warmup)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=spec.train.lr,
        betas=spec.train.adam_betas,
        weight_decay=spec.train.weight_decay,
    )
    state = TrainState(spec, model, model, ema, optimizer, build_diffusion(spec), dataset,
                       validation=validation_set(spec.data, spec.train.val_images))
    if resume_from is not None:
        bundle = load_bundle(resume_from)
        model.load_state_dict(bundle["model"])
        ema.load_state_dict(bundle["ema"])
        optimizer.load_state_dict(bundle["optimizer"])
        restore_rng_state(bundle["rng"])
        state.step = int(bundle["step"])
    # Wrap after loading: DDP broadcasts rank 0's weights at construction.
    state.wrapped = placement.wrap_model(model)
    return state


def train_step(state: TrainState, placement: Placement) -> dict[str, float]:
    """One optimizer step on this rank's share of the global batch."""
    spec, train = state.spec, state.spec.train
    local_batch = train.batch_size // placement.world_size
    g = step_generator(spec.seed, placement.rank, state.step)
    idx = torch.randperm(len(state.dataset), generator=g)[:local_batch]
    x0, y = state.dataset.batch(idx)
    t = torch.randint(state.diffusion.num_timesteps, (len(idx),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(len(idx), generator=g) < spec.model.class_dropout_prob
    dev = placement.device
    x0, y, t, noise, drop = (v.to(dev) for v in (x0, y, t, noise, drop))

    lr = lr_at(state.step, train)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=train.precision == "bf16"):
        terms = training_losses(state.wrapped, state.diffusion, x0, t, y, noise, drop)
    loss = terms["loss"].mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), train.grad_clip or float("inf"))
    state.optimizer.step()
    state.ema.update(state.model)
    state.step += 1
    out = {k: float(v.detach().mean()) for k, v in terms.items()}
    out.update(lr=lr, grad_norm=float(grad_norm))
    return out


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


def make_bundle(state: TrainState) -> dict:
    return {
        "step": state.step,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "rng": capture_rng_state(),
        "spec": state.spec.to_dict(),
        "model_config": state.model.config.to_dict(),
    }


def maybe_checkpoint(state: TrainState, placement: Placement, reporter: Reporter, metrics: dict, force: bool) -> bool:
    """At checkpoint steps every rank reports; rank 0 attaches the bundle."""
    if not (force or state.step % state.spec.train.checkpoint_every == 0):
        return False
    if placement.rank != 0:
        reporter.report(metrics, None)
        return True
    with tempfile.TemporaryDirectory(prefix="ditlab-ckpt-") as tmp:
        save_bundle(f"{tmp}/{BUNDLE_NAME}", make_bundle(state))
        reporter.report(metrics, tmp)
    return True


def is_validation_step(state: TrainState) -> bool:
    every = state.spec.train.val_every or state.spec.train.log_every
    return state.validation is not None and (state.step % every == 0 or state.step == state.spec.train.steps)


def maybe_validate(state: TrainState, placement: Placement) -> dict[str, float]:
    """`val_loss` at validation steps. Every rank holds the same weights and scores the same
    fixed set, so every rank reports the same value without a collective."""
    if not is_validation_step(state):
        return {}
    weights = state.ema.model if state.spec.train.val_weights == "ema" else state.model
    return {"val_loss": validation_loss(weights, state.diffusion, state.validation, placement.device)}


def train(spec: ExperimentSpec, reporter: Reporter, placement: Placement | None = None,
          resume_from: str | None = None) -> TrainState:
    """Run (or continue) training to `spec.train.steps`, reporting every `log_every` steps,
    `val_loss` every `val_every` steps (default: log_every), checkpointing every `checkpoint_every`
    steps, and all three at the end."""
    placement = placement or Placement()
    state = setup(spec, placement, resume_from)
    window: list[dict[str, float]] = []
    tic, images = time.perf_counter(), 0
    while state.step < spec.train.steps:
        state.wrapped.train()
        window.append(train_step(state, placement))
        if not math.isfinite(window[-1]["loss"]):
            raise TrainingDiverged(f"training loss is {window[-1]['loss']} at step {state.step}")
        images += spec.train.batch_size
        last = state.step == spec.train.steps
        if (state.step % spec.train.log_every and state.step % spec.train.checkpoint_every and not last
                and not is_validation_step(state)):
            continue
        metrics = mean_across_ranks({k: float(np.mean([w[k] for w in window])) for k in window[0]}, placement.device)
        elapsed = time.perf_counter() - tic
        metrics.update(step=state.step, images_per_sec=images / max(elapsed, 1e-9),
                       epoch=state.step * spec.train.batch_size / len(state.dataset))
        metrics.update(maybe_validate(state, placement))  # after the clock: not counted as training time
        window, tic, images = [], time.perf_counter(), 0
        if not maybe_checkpoint(state, placement, reporter, metrics, force=last):
            reporter.report(metrics, None)
    if spec.train.steps == 0:  # an untrained baseline still gets a checkpoint to sample from
        maybe_checkpoint(state, placement, reporter, {"step": 0}, force=True)
    return state
