"""Samplers. Every sampler has one signature:

    sampler(denoise, x, diffusion, steps, generator=None, callback=None, clip_x0=True) -> x_0

`denoise(x_t, t)` returns the network output (prediction channels, plus variance channels when the
model learns sigma); `x` is the starting noise; `steps` how many network evaluations to spend.
Classifier-free guidance is a wrapper around `denoise` (see `guided_denoiser`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditlab.diffusion.process import GaussianDiffusion
from ditlab.diffusion.schedules import spaced_timesteps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_denoiser(model, labels: torch.Tensor, guidance: float, null_class: int) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): out = uncond + w (cond - uncond).

    Guidance is applied to the prediction channels only; a learned variance is taken from the
    conditional half. w = 1 is plain conditional sampling and costs one forward pass."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return model(x, t, labels)
        null = torch.full_like(labels, null_class)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        c = x.shape[1]
        guided = uncond[:, :c] + guidance * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)

    return denoise


def _predict(denoise, diffusion, x, t_value, clip_x0):
    t = torch.full((x.shape[0],), int(t_value), device=x.device, dtype=torch.long)
    out = denoise(x, t).float()
    c = x.shape[1]
    x0, eps = diffusion.to_x0_eps(out[:, :c], x, t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        a, s = diffusion.coefficients(t, x.ndim)
        eps = (x - a * x0) / s
    return out, x0, eps, t


@torch.no_grad()
def ddim_sample(denoise, x, diffusion: GaussianDiffusion, steps, generator=None, callback=None,
                clip_x0=True, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12): deterministic for eta = 0, ancestral-like for eta = 1."""
    ts = spaced_timesteps(diffusion.num_timesteps, steps)
    ab = diffusion.alphas_cumprod
    for i, t_value in enumerate(ts):
        _, x0, eps, _ = _predict(denoise, diffusion, x, t_value, clip_x0)
        a_t = float(ab[t_value])
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        if callback is not None:
            callback({"i": i, "t": int(t_value), "x": x, "x0": x0})
    return x


@torch.no_grad()
def ddpm_sample(denoise, x, diffusion: GaussianDiffusion, steps, generator=None, callback=None,
                clip_x0=True):
    """Ancestral sampling from p(x_{t-1} | x_t) (Ho et al. 2020, algorithm 2) on `steps` respaced
    timesteps; uses the learned variance when the model outputs one, else beta_tilde."""
    ts = spaced_timesteps(diffusion.num_timesteps, steps)
    spaced = diffusion.respaced(ts)
    for i, t_value in enumerate(ts):
        j = len(ts) - 1 - i  # index in the respaced chain
        out, x0, _, t = _predict(denoise, diffusion, x, t_value, clip_x0)
        tj = torch.full_like(t, j)
        mean = spaced.posterior_mean(x0, x, tj)
        c = x.shape[1]
        if out.shape[1] == 2 * c:
            log_var = spaced.model_log_variance(out[:, c:], tj)
        else:
            log_var = spaced.posterior_log_variance.to(x.device)[tj].float().reshape(-1, 1, 1, 1)
        x = mean
        if j > 0:
            x = x + torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=generator, device=x.device)
        if callback is not None:
            callback({"i": i, "t": int(t_value), "x": x, "x0": x0})
    return x


SAMPLERS = {"ddim": ddim_sample, "ddpm": ddpm_sample}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
