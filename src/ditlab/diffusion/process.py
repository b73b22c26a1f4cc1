"""The Gaussian diffusion process: forward noising q(x_t | x_0), prediction targets and the
conversions between what the network predicts (epsilon, v or x_0) and the clean image."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ditlab.diffusion.schedules import alphas_cumprod, beta_schedule

Prediction = Literal["eps", "v", "x0"]


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] reshaped to broadcast over an (N, C, H, W) batch."""
    return values.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """Discrete-time DDPM process with T steps. Schedule arrays are kept in float64 and cast per use."""

    def __init__(self, betas: np.ndarray, prediction: Prediction = "eps", schedule: str = "custom",
                 min_snr_gamma: float | None = None):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction {prediction!r}; expected eps, v or x0")
        betas = np.asarray(betas, dtype=np.float64)
        self.schedule = schedule
        self.min_snr_gamma = min_snr_gamma  # training loss weighting: see `loss_weight`
        self.num_timesteps = len(betas)
        self.prediction = prediction
        ab = alphas_cumprod(betas)
        ab_prev = np.append(1.0, ab[:-1])
        self.betas = torch.from_numpy(betas)
        self.alphas_cumprod = torch.from_numpy(ab)
        self.alphas_cumprod_prev = torch.from_numpy(ab_prev)
        # Posterior q(x_{t-1} | x_t, x_0) variance, Ho et al. 2020, eq. 7; it is 0 at t=0, so the
        # log uses t=1's value there (as improved-diffusion does).
        posterior_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        self.posterior_variance = torch.from_numpy(posterior_var)
        self.posterior_log_variance = torch.from_numpy(np.log(np.append(posterior_var[1], posterior_var[1:])))

    @classmethod
    def from_schedule(cls, schedule: str = "cosine", num_timesteps: int = 1000, prediction: Prediction = "eps",
                      min_snr_gamma: float | None = None):
        return cls(beta_schedule(schedule, num_timesteps), prediction, schedule, min_snr_gamma)

    def respaced(self, timesteps: np.ndarray) -> GaussianDiffusion:
        """A shorter chain over the given ascending timesteps, keeping alpha_bar at each of them
        (Nichol & Dhariwal 2021, section 4): beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
        ab = self.alphas_cumprod.numpy()[np.sort(timesteps)]
        betas = 1.0 - ab / np.append(1.0, ab[:-1])
        return GaussianDiffusion(betas, self.prediction, f"{self.schedule}-respaced", self.min_snr_gamma)

    def coefficients(self, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)): the signal and noise scales at t."""
        ab = _gather(self.alphas_cumprod, t, ndim)
        return ab.sqrt(), (1 - ab).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4)."""
        a, s = self.coefficients(t, x0.ndim)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output. v = alpha eps - sigma x_0 (Salimans & Ho 2022)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, s = self.coefficients(t, x0.ndim)
        return a * noise - s * x0

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Each sample's weight in the training loss: 1, or with `min_snr_gamma` set, Min-SNR-gamma
        (Hang et al. 2023): the x0 error weighted by min(SNR_t, gamma). The squared error of an eps
        target is the x0 error times SNR, of a v target times SNR + 1, so these get
        min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1). Low-noise steps, where SNR is large
        and the target is easy, then weigh less."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        ab = self.alphas_cumprod.to(t.device)[t]
        snr = ab / (1 - ab)
        capped = snr.clamp(max=self.min_snr_gamma)
        weight = {"x0": capped, "eps": capped / snr, "v": capped / (snr + 1)}[self.prediction]
        return weight.float()

    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a prediction (eps, v or x0) at x_t into the implied (x_0, eps) pair."""
        a, s = self.coefficients(t, x_t.ndim)
        if self.prediction == "eps":
            return (x_t - s * output) / a, output
        if self.prediction == "x0":
            return output, (x_t - a * output) / s
        x0 = a * x_t - s * output
        return x0, s * x_t + a * output

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0), Ho et al. 2020, eq. 7."""
        beta = _gather(self.betas, t, x_t.ndim)
        ab = _gather(self.alphas_cumprod, t, x_t.ndim)
        ab_prev = _gather(self.alphas_cumprod_prev, t, x_t.ndim)
        c0 = beta * ab_prev.sqrt() / (1 - ab)
        ct = (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)
        return c0 * x0 + ct * x_t

    def model_log_variance(self, frac: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Learned variance as an interpolation between log beta_tilde and log beta
        (Nichol & Dhariwal 2021, eq. 15); `frac` is the network's raw output in [-1, 1]."""
        min_log = _gather(self.posterior_log_variance, t, frac.ndim)
        max_log = _gather(torch.log(self.betas), t, frac.ndim)
        w = (frac + 1) / 2
        return w * max_log + (1 - w) * min_log
