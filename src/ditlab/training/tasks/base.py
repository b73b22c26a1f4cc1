"""The Task seam: what one kind of experiment brings to the training loop.

The loop (training/loop.py) owns what every experiment shares: the batch each rank draws, the
learning-rate schedule, EMA, report windows, the NaN stop, checkpoint cadence and timing. A task
owns what differs: its modules and optimizers, one optimization step on a batch, its validation
figure, the extra state it keeps in the checkpoint bundle, the checks it needs before a run starts,
and the evaluation its checkpoints get. A new kind of experiment is a new subclass in its own module
plus its spec section, registered in training/tasks/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ditlab.config import EvaluationSpec, ExperimentSpec
from ditlab.data import ImageDataset, load_dataset
from ditlab.training.ema import EMA
from ditlab.training.optim import clip_grad_norm
from ditlab.training.tasks.adversarial import Adversary


@dataclass(frozen=True)
class Batch:
    """This rank's share of one global batch, on the task's device."""

    images: torch.Tensor  # [B, C, R, R] in [-1, 1]
    labels: torch.Tensor  # [B] int64
    # [B] int64 positions in the training split: a task that derives inputs from an image's identity
    # (restoration's seeded degradation) gets the same input on whichever rank and step it lands.
    indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


class Task(ABC):
    """One kind of experiment. Subclasses build `model` (the module EMA tracks, checkpoints store as
    "model" and evaluation samples from) and `optimizer` in `__init__`, from the spec."""

    name: ClassVar[str]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    adversary: Adversary | None = None  # a discriminator and its optimizer (loss.adversarial_weight > 0)

    def __init__(self, spec: ExperimentSpec, num_classes: int, device: torch.device):
        self.spec, self.num_classes, self.device = spec, num_classes, device

    # -- before the run --------------------------------------------------------------------------

    @classmethod
    def preflight(cls, spec: ExperimentSpec) -> None:
        """Checks that touch the disk or another file (a teacher checkpoint, say), run before Ray
        starts. Raise ValueError with a message that names the field."""
        return None

    @classmethod
    def streams(cls, spec: ExperimentSpec) -> bool:
        """Whether the task can train on a shard set streamed through Ray Data (data.format: shards):
        it must train on the set's images (or latents) one batch at a time."""
        return True

    @classmethod
    def stream_location(cls, spec: ExperimentSpec) -> str:
        """The shard set a streaming run reads its train split from (a path or URI): the spec's data
        (a latent generation spec: its latent cache, built here when missing)."""
        from ditlab.data.shards import normalize

        return normalize(spec.data.path)

    @classmethod
    def training_data(cls, spec: ExperimentSpec) -> ImageDataset:
        """What the loop draws batches from: the train split of the spec's data (a latent
        generation spec: its encoded latents)."""
        return load_dataset(spec.data, "train")

    # -- modules ---------------------------------------------------------------------------------

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer; the loop sets the scheduled learning rate on each before a step."""
        return [self.optimizer] + ([self.adversary.optimizer] if self.adversary else [])

    def wrap(self, wrap_model: Callable[[nn.Module], nn.Module]) -> None:
        """Distribute the trained modules (DDP under Ray Train), with the spec's gradient checkpointing
        and torch.compile. Called once, after any resume."""
        if hasattr(self.model, "gradient_checkpointing"):
            self.model.gradient_checkpointing = self.spec.train.grad_checkpointing
        self.forward_model = wrap_model(self.model)
        if self.spec.train.compile:
            self.forward_model = torch.compile(self.forward_model)
        if self.adversary:
            self.adversary.wrap(wrap_model)

    def model_config(self) -> dict[str, Any]:
        """What rebuilds `model` without the spec (stored in the bundle as "model_config")."""
        return self.model.config.to_dict()

    def learning_rate(self, optimizer: torch.optim.Optimizer, scheduled: float) -> float:
        """`optimizer`'s learning rate this step: the loop's schedule (train.lr), unless a phase of the
        task sets its own (distribution matching in a distillation round)."""
        return scheduled

    def set_train_mode(self) -> None:
        self.model.train()
        if self.adversary:
            self.adversary.discriminator.train()

    # -- one step ----------------------------------------------------------------------------------

    def before_step(self, step: int, ema: EMA) -> None:
        """Called before every optimization step with the number of steps done so far and the loop's
        EMA: a task that changes phase at a step (a distillation round) does it here, so a run
        resumed from a checkpoint at that step makes the same change."""
        return None

    @abstractmethod
    def step(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        """One optimization step on `batch`. Everything random (noise, timesteps, dropout masks) is
        drawn from `generator`, which the loop seeds by (seed, rank, step): that makes resume exact.
        Returns this rank's figures; "loss" is required (a non-finite one makes the gradients it
        backpropagates non-finite, and the loop's guard skips the step)."""

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for forward passes (`train.precision`)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.spec.train.precision == "bf16")

    def accumulate(self, losses: Callable[[slice], dict[str, torch.Tensor]], n: int,
                   optimizer: torch.optim.Optimizer, params) -> tuple[dict[str, torch.Tensor], float]:
        """One optimizer step over n samples in `train.grad_accumulation` micro-batches: `losses(s)`
        gives the per-sample terms (a "loss" among them) of samples s; each micro-batch's share of the
        batch mean is backpropagated, DDP all-reducing on the last only. Then clip and step as
        `optimize`. (every micro-batch's terms, concatenated; the gradient norm)"""
        k = self.spec.train.grad_accumulation
        if k == 1:
            with self.autocast():
                terms = losses(slice(0, n))
            return terms, self.optimize(terms["loss"].mean(), optimizer, params)
        optimizer.zero_grad(set_to_none=True)
        bounds = torch.linspace(0, n, k + 1).round().long().tolist()
        parts = []
        for i in range(k):
            last = i == k - 1
            no_sync = getattr(self.forward_model, "no_sync", None)
            with (nullcontext() if last or no_sync is None else no_sync()), self.autocast():
                terms = losses(slice(bounds[i], bounds[i + 1]))
            (terms["loss"].mean() * ((bounds[i + 1] - bounds[i]) / n)).backward()
            parts.append({key: v.detach() for key, v in terms.items()})
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}, self.clip_and_step(optimizer, params)

    def optimize(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params) -> float:
        """Backward, clip to `train.grad_clip`, step; the gradient norm before clipping."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self.clip_and_step(optimizer, params)

    def clip_and_step(self, optimizer: torch.optim.Optimizer, params) -> float:
        grad_norm = clip_grad_norm(params, self.spec.train.grad_clip or float("inf"))
        optimizer.step()
        return grad_norm

    # -- validation and checkpoint state -------------------------------------------------------------

    @property
    def validates(self) -> bool:
        """Whether `validation` reports anything (the loop then reports at validation steps)."""
        return False

    def validation(self, weights: nn.Module) -> dict[str, float]:
        """Figures on held-out data for `weights` (the EMA or the live model, per train.val_weights).
        Every rank holds the same weights and scores the same set: no collective needed."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """State beyond model, EMA and the first optimizer (the discriminator and its optimizer),
        stored in the bundle as "task_state"."""
        return self.adversary.state_dict() if self.adversary else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore `extra_state`; bundles written before a task had any extra state pass {}."""
        if self.adversary:
            self.adversary.load_state_dict(state)

    def sample_quality(self, weights: nn.Module) -> dict[str, float]:
        """Figures on samples of `weights` at `train.eval_every` steps (generation: FID and KID).
        Called on every rank at the same steps; every rank must return the same figures (a task
        that splits the work over the ranks gathers the result itself)."""
        return {}

    # -- after training ----------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def evaluate_checkpoint(cls, bundle: dict, source: str, ev: EvaluationSpec | None = None,
                            progress: bool = False, reference=None):
        """The evaluation a checkpoint of this task gets (an evaluation.suite.Report), from its loaded
        bundle (`source`: where it was read, for messages). `ev` defaults to the checkpoint's own
        evaluation settings, `reference` to its own dataset's split."""
