"""Build a spec's model and diffusion process: shared by training (the tasks), sampling and evaluation,
so that none of them imports another to get them."""

from __future__ import annotations

from ditlab.config import ExperimentSpec
from ditlab.diffusion import GaussianDiffusion
from ditlab.models import DiT, build_model


def build_diffusion(spec: ExperimentSpec) -> GaussianDiffusion:
    d = spec.diffusion
    return GaussianDiffusion.from_schedule(d.schedule, d.num_timesteps, d.prediction)


def build_dit(spec: ExperimentSpec, num_classes: int) -> DiT:
    """The spec's DiT preset for its data (resolution, channels) and `num_classes` labels."""
    return build_model(
        spec.model.name,
        input_size=spec.data.resolution,
        in_channels=spec.data.channels,
        num_classes=num_classes,
        learn_sigma=spec.model.learn_sigma,
        class_dropout_prob=spec.model.class_dropout_prob,
        dropout=spec.model.dropout,
    )
