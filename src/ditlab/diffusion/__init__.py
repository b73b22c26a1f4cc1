"""Diffusion: schedules, the forward process, losses and samplers. Knows nothing of the network."""

from ditlab.diffusion.losses import training_losses
from ditlab.diffusion.process import GaussianDiffusion
from ditlab.diffusion.samplers import SAMPLERS, get_sampler, guided_denoiser
from ditlab.diffusion.schedules import beta_schedule

__all__ = ["GaussianDiffusion", "training_losses", "SAMPLERS", "get_sampler", "guided_denoiser", "beta_schedule"]
