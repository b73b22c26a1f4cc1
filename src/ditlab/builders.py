"""Build a spec's model and diffusion process: shared by training (the tasks), sampling and evaluation,
so that none of them imports another to get them."""

from __future__ import annotations

from ditlab.config import ExperimentSpec
from ditlab.diffusion import GaussianDiffusion
from ditlab.models import DiT, build_model


def build_diffusion(spec: ExperimentSpec) -> GaussianDiffusion:
    d = spec.diffusion
    return GaussianDiffusion.from_schedule(d.schedule, d.num_timesteps, d.prediction,
                                           d.min_snr_gamma if d.loss_weighting == "min_snr" else None)


def build_dit(spec: ExperimentSpec, num_classes: int, latent_shape: tuple[int, int, int] | None = None) -> DiT:
    """The spec's DiT preset (with its `model.depth`, when set) for its data (resolution, channels),
    or for latents of `latent_shape` (channels, size, size), and `num_classes` labels."""
    channels, size = (spec.data.channels, spec.data.resolution) if latent_shape is None else latent_shape[:2]
    return build_model(
        spec.model.name,
        **spec.model.architecture(),
        input_size=size,
        in_channels=channels,
        num_classes=num_classes,
        learn_sigma=spec.model.learn_sigma,
        class_dropout_prob=spec.model.class_dropout_prob,
        dropout=spec.model.dropout,
        conditioning=spec.model.conditioning,
        text_encoder=spec.model.text_encoder,
        text_injection=spec.model.text_injection,
        max_caption_tokens=spec.model.max_caption_tokens,
    )
