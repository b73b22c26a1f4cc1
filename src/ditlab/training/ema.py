"""Exponential moving average of the weights, the model that gets sampled and evaluated."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, after every optimizer step.

    With `warmup`, the decay is min(decay, (1 + n) / (10 + n)) at update n, so a short run is not
    dominated by its random initialization (the num_updates rule of TensorFlow's
    ExponentialMovingAverage)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = list(self.model.parameters())  # the same tensors for life: load_state_dict copies into them
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        # One foreach call for all parameters: the same values as a lerp_ per parameter, without a
        # dispatch for each (72 in the quickstart's 6-block model; BENCHMARKS.md, "64 images a
        # process, and the step's tail").
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self._params):
            raise ValueError(f"EMA of a model with {len(self._params)} parameters updated from one with {len(params)}")
        if params:
            torch._foreach_lerp_(self._params, params, 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
