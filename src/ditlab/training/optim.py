"""The optimizer every task trains with, and the gradient clipping before it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so that their 2-norm, all taken together, is at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does, and return that norm before scaling.

    Two differences in how, none in the result. The norm is taken with one foreach call, where
    torch's function takes one norm per gradient on a CPU (foreach is its default only on GPUs). And
    the gradients are left alone where the coefficient `max_norm / (norm + 1e-6)` is at least 1:
    torch multiplies them by the coefficient clamped to 1, which changes no value, to spare GPUs a
    synchronisation. Here the norm is read anyway (the logged `grad_norm`), and most steps do not
    clip: a run of the quickstart in one process clipped 2 of its first 50 steps and none after. On
    its 6-block model (1.9M parameters) that multiplication is a pass over 7.6 MB of gradients, read
    and written. With the EMA's foreach call (training/ema.py), the step ran 1.02x as fast in one
    process; inside the 2-worker run the gain was under the noise (BENCHMARKS.md, "64 images a
    process, and the step's tail"). A NaN or infinite norm still scales them, as torch does."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    total = nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if not bool(max_norm / (total + 1e-6) >= 1.0):
        nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)
