"""Denoiser networks: DiT and its named presets."""

from ditlab.models.dit import DiT, DiTConfig
from ditlab.models.registry import PRESETS, build_model, model_from_config

__all__ = ["DiT", "DiTConfig", "PRESETS", "build_model", "model_from_config"]
