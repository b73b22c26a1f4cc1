"""The optimizer every task trains with."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Devices whose AdamW has a fused kernel in the torch this project pins.
FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float],
          weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where every parameter allows it: one kernel over all parameters instead of
    torch's default on CPU, a loop of a dozen small ops per parameter. The same update up to float
    rounding; on DiT-Ti/4's 1.9M parameters (6 blocks), one CPU thread, a step of the optimizer
    takes 1.5 ms instead of 5.1 (BENCHMARKS.md, "Training step"). A run resumed from a checkpoint
    keeps the setting it was saved with (torch restores it with the optimizer's state)."""
    params = list(params)
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params) or None
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
