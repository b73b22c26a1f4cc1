"""Noise schedules as pure functions of the number of steps. All arrays are float64."""

from __future__ import annotations

import math

import numpy as np


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Ho et al. 2020: betas linear from 1e-4 to 0.02 at T=1000, rescaled so other T keep the
    same end-to-end noise level (as in the DiT and improved-diffusion code)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(t: np.ndarray | float, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2), t in [0, 1]."""
    return np.cos((np.asarray(t, dtype=np.float64) + s) / (1 + s) * math.pi / 2) ** 2


def cosine_beta_schedule(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas whose cumulative product follows `cosine_alpha_bar`; clipped at `max_beta` to avoid
    the singularity at t = 1 (Nichol & Dhariwal 2021, section 3.2)."""
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(t)
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    if name not in SCHEDULES:
        raise KeyError(f"unknown noise schedule {name!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](num_timesteps)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return np.cumprod(1.0 - betas)


def _check_steps(num_timesteps: int, steps: int) -> None:
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")


def spaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` timesteps evenly spread over [0, T-1], descending, always ending at 0."""
    _check_steps(num_timesteps, steps)
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64))[::-1].copy()


def trailing_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` timesteps round(k T / steps) - 1 for k = steps, ..., 1, descending, always starting at
    T-1 (the "trailing" spacing of Lin et al. 2024). The sampler's last move goes from the
    smallest of them to the clean image, so one step is a jump from pure noise to x_0, and the grid
    of N steps holds the grid of N/2: what progressive distillation needs (a student's step spans
    exactly two of its teacher's)."""
    _check_steps(num_timesteps, steps)
    k = np.arange(steps, 0, -1)
    return (np.round(k * num_timesteps / steps) - 1).astype(np.int64)
