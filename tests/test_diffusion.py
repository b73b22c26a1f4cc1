import math

import numpy as np
import pytest
import torch

from ditlab.diffusion import GaussianDiffusion, get_sampler, guided_denoiser, training_losses
from ditlab.diffusion.schedules import cosine_beta_schedule, linear_beta_schedule, spaced_timesteps, trailing_timesteps
from ditlab.models import build_model


def test_linear_schedule_endpoints():
    betas = linear_beta_schedule(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert linear_beta_schedule(100)[-1] == pytest.approx(0.2)  # rescaled by 1000 / T


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    ab = np.cumprod(1 - cosine_beta_schedule(T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert ab[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert np.all(np.diff(ab) < 0)


def test_spaced_timesteps():
    ts = spaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    with pytest.raises(ValueError):
        spaced_timesteps(10, 11)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_target_inverts_to_x0_and_eps(prediction):
    d = GaussianDiffusion.from_schedule("cosine", 1000, prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 100, 600, 998])
    x_t = d.q_sample(x0, t, noise)
    got_x0, got_eps = d.to_x0_eps(d.target(x0, noise, t), x_t, t)
    assert torch.allclose(got_x0, x0, atol=2e-3) and torch.allclose(got_eps, noise, atol=2e-3)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weighting_is_the_x0_error_weighted_by_the_capped_snr(prediction):
    """Whatever the target, the weighted squared error of a wrong prediction equals its x0 error
    times min(SNR, gamma) (Hang et al. 2023); without the option every weight is 1."""
    t = torch.tensor([1, 100, 400, 700, 990])
    assert torch.equal(GaussianDiffusion.from_schedule("cosine", 1000, prediction).loss_weight(t), torch.ones(5))
    d = GaussianDiffusion.from_schedule("cosine", 1000, prediction, min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)
    x0, noise, wrong = (torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = d.q_sample(x0, t, noise)
    target_error = (wrong - d.target(x0, noise, t)).pow(2).flatten(1).mean(1)
    x0_error = (d.to_x0_eps(wrong, x_t, t)[0] - x0).pow(2).flatten(1).mean(1)
    ab = d.alphas_cumprod[t]
    capped = (ab / (1 - ab)).clamp(max=5.0)
    assert capped.min() < 1 and capped.max() == 5.0  # both sides of the cap are covered
    # rtol: the schedule's coefficients are float32
    assert torch.allclose(d.loss_weight(t).double() * target_error, capped * x0_error, rtol=1e-3)


def test_the_spec_names_every_sampler_and_no_other():
    """config.SamplerName (the spec's evaluation.sampler, the CLIs' --sampler choices) and SAMPLERS are
    two lists of the same samplers: a sampler added to one only is a spec error or a KeyError later."""
    from typing import get_args

    from ditlab.config import STUDENT_SAMPLERS, SamplerName
    from ditlab.diffusion import SAMPLERS

    assert set(get_args(SamplerName)) == set(SAMPLERS) and set(STUDENT_SAMPLERS) <= set(SAMPLERS)


def oracle(d: GaussianDiffusion, point: torch.Tensor):
    """The exact denoiser for data that is a single point: it knows x_0."""

    def denoise(x, t):
        a, s = d.coefficients(t, x.ndim)
        return d.target(point.expand_as(x), (x - a * point) / s, t)

    return denoise


@pytest.mark.parametrize("sampler", ["ddim", "ddim-trailing", "ddim-trailing-stochastic", "ddpm", "dpmpp-2m"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_recover_the_data_point_with_an_exact_denoiser(sampler, prediction):
    d = GaussianDiffusion.from_schedule("linear", 1000, prediction)
    point = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    g = torch.Generator().manual_seed(1)
    out = get_sampler(sampler)(oracle(d, point), torch.randn(3, 1, 4, 4, generator=g), d, 20, generator=g)
    assert torch.allclose(out, point.expand(3, -1, -1, -1), atol=1e-3)  # float32 eps -> x0 at t near T


def test_the_stochastic_student_sampler_keeps_each_level_s_marginal_and_draws_fresh_noise():
    """ddim-trailing-stochastic with the exact denoiser of one data point: after each step x sits at the
    next grid level as the forward process puts it there (x = sqrt(ab) x_0 + sqrt(1 - ab) e, e of unit
    variance), and e keeps only sqrt(r (1 - ab_skip) / (1 - ab_next)) of the last level's noise (the
    double-length DDIM step keeps all of it, the re-noising adds the rest); plain DDIM keeps it all."""
    d = GaussianDiffusion.from_schedule("cosine", 1000, "v")
    point = torch.zeros(1, 1, 64, 64).uniform_(-0.9, 0.9, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts, ab = trailing_timesteps(1000, 4), d.alphas_cumprod

    def noise_at_each_level(name):
        levels = []

        def record(state):
            if state["i"] + 1 < len(ts):
                a = float(ab[ts[state["i"] + 1]])
                levels.append((state["x"] - a**0.5 * point) / (1 - a) ** 0.5)

        get_sampler(name)(oracle(d, point), x_T, d, 4, generator=torch.Generator().manual_seed(2), callback=record,
                          clip_x0=False)
        return levels

    kept = 1.0
    for i, e in enumerate(noise_at_each_level("ddim-trailing-stochastic")):
        a_next, a_skip = float(ab[ts[i + 1]]), float(ab[ts[i + 2]]) if i + 2 < len(ts) else 1.0
        kept *= (a_next / a_skip * (1 - a_skip) / (1 - a_next)) ** 0.5
        assert float(e.std()) == pytest.approx(1.0, abs=0.05)
        assert float(torch.corrcoef(torch.stack([e.flatten(), x_T.flatten()]))[0, 1]) == pytest.approx(kept, abs=0.04)
    assert kept < 0.5
    for e in noise_at_each_level("ddim-trailing"):
        assert torch.allclose(e, x_T, atol=1e-3)


def test_dpm_solver_pp_converges_at_second_order_on_the_probability_flow_ode():
    """Gaussian data N(0, s^2): the exact denoiser is linear, and the probability-flow ODE maps x_T to
    x_T * s / std(x_T). Going from 50 to 250 steps (h / 5) cuts DPM-Solver++(2M)'s error about 25x
    (second order) and DDIM's about 5x (first order)."""
    d = GaussianDiffusion.from_schedule("cosine", 1000, "eps")
    s = 0.5

    def denoise(x, t):  # eps prediction of the posterior mean of x_0
        a, sigma = d.coefficients(t, x.ndim)
        x0 = a * s**2 * x / (a**2 * s**2 + sigma**2)
        return (x - a * x0) / sigma

    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab_T = float(d.alphas_cumprod[-1])
    exact = x_T * s / (ab_T * s**2 + 1 - ab_T) ** 0.5
    error = {(name, n): (get_sampler(name)(denoise, x_T, d, n, clip_x0=False) - exact).abs().max().item()
             for name in ("ddim", "dpmpp-2m") for n in (50, 250)}
    assert error["dpmpp-2m", 50] / error["dpmpp-2m", 250] > 15, error
    assert error["ddim", 50] / error["ddim", 250] < 7, error
    assert error["dpmpp-2m", 250] < error["ddim", 250] / 5, error


def test_samplers_are_deterministic_given_the_generator():
    d = GaussianDiffusion.from_schedule("cosine", 100, "eps")
    model = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    denoise = guided_denoiser(model.eval(), torch.tensor([1, 2]), 2.0, model.null_class)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return get_sampler("ddpm")(denoise, torch.randn(2, 1, 8, 8, generator=g), d, 10, generator=g)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_classifier_free_guidance_combination():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return (y.float() * 10).reshape(-1, 1, 1, 1).expand(len(x), 2, 2, 2).clone()

    labels = torch.tensor([1, 2])
    out = guided_denoiser(model, labels, 3.0, null_class=5)(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    # prediction channel: uncond + w (cond - uncond) = 50 + 3 (10 y - 50); variance channel: cond
    assert torch.allclose(out[:, 0], (50 + 3 * (labels * 10 - 50)).float().reshape(2, 1, 1))
    assert torch.allclose(out[:, 1], (labels * 10).float().reshape(2, 1, 1))
    assert calls == [4]  # one batched pass for cond and uncond
    guided_denoiser(model, labels, 1.0, 5)(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    assert calls[-1] == 2  # w = 1 costs a single conditional pass


def test_learned_sigma_loss_terms_are_finite():
    d = GaussianDiffusion.from_schedule("linear", 100, "eps")
    model = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=True)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    t, y = torch.tensor([0, 1, 50, 99]), torch.tensor([0, 1, 2, 3])
    terms = training_losses(model, d, x0, t, y, torch.randn_like(x0))
    assert set(terms) == {"mse", "vb", "loss"}
    assert torch.isfinite(terms["loss"]).all() and (terms["vb"] >= -1e-6).all()
    terms["loss"].mean().backward()
