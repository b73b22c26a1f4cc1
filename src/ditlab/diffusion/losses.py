"""Training losses. `training_losses` returns per-sample terms, so callers can weight or log them."""

from __future__ import annotations

import math

import torch

from ditlab.diffusion.process import GaussianDiffusion


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x) of data quantized to 256 levels in [-1, 1] (Ho et al. 2020, eq. 13), elementwise."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


def variational_bound_term(diffusion, output_mean_part, frac, x0, x_t, t) -> torch.Tensor:
    """L_vlb term for a learned variance (Nichol & Dhariwal 2021, eq. 16), in bits per dimension.

    The mean is taken from a detached prediction, so this term trains only the variance."""
    pred_x0, _ = diffusion.to_x0_eps(output_mean_part.detach(), x_t, t)
    model_mean = diffusion.posterior_mean(pred_x0, x_t, t)
    model_logvar = diffusion.model_log_variance(frac, t)
    true_mean = diffusion.posterior_mean(x0, x_t, t)
    true_logvar = diffusion.posterior_log_variance.to(t.device)[t].float().reshape(-1, 1, 1, 1)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(
    model,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    drop_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample losses: `mse` on the prediction target, plus `vb` when the model learns sigma;
    `loss` is their sum (the "hybrid" objective; vb rescaled by T/1000 as in improved DDPM)."""
    x_t = diffusion.q_sample(x0, t, noise)
    output = model(x_t, t, y, drop_mask)
    channels = x0.shape[1]
    mean_part = output[:, :channels]
    mse = (mean_part.float() - diffusion.target(x0, noise, t)).pow(2).flatten(1).mean(1)
    terms = {"mse": mse * diffusion.loss_weight(t)}
    if output.shape[1] == 2 * channels:
        vb = variational_bound_term(diffusion, mean_part.float(), output[:, channels:].float(), x0, x_t, t)
        terms["vb"] = vb * diffusion.num_timesteps / 1000.0
    terms["loss"] = sum(terms.values())
    return terms
