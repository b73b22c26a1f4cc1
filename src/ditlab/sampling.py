"""Sampling from a checkpoint bundle: rebuild the model from the stored spec, draw class-conditional
samples with any sampler and guidance scale, and save them as PNG files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ditlab.atomic import atomic_path
from ditlab.builders import build_diffusion
from ditlab.config import ExperimentSpec, from_dict
from ditlab.data import to_uint8
from ditlab.diffusion import GaussianDiffusion, get_sampler, guided_denoiser
from ditlab.models import DiT, model_from_config
from ditlab.training.checkpoint import CheckpointError, load_bundle


@dataclass
class LoadedCheckpoint:
    model: DiT
    diffusion: GaussianDiffusion
    spec: ExperimentSpec
    step: int
    # A latent model's decoder (latents -> images in [-1, 1]); None for a model of pixels.
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None


def load_for_sampling(path: str | Path, weights: str = "ema") -> LoadedCheckpoint:
    """`weights` is "ema" (what papers evaluate) or "model" (the raw trained weights)."""
    return from_bundle(load_bundle(path), str(path), weights)


def from_bundle(bundle: dict, source: str, weights: str = "ema") -> LoadedCheckpoint:
    """The sampling view of a bundle already loaded (from `source`, named in errors)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    spec = from_dict(bundle["spec"], source=f"spec stored in {source}")
    model = _model_with_weights(bundle, source, weights)
    latent = bundle.get("task_state", {}).get("latent")
    decode = None
    if latent is not None:
        from ditlab.latents import LatentDecoder

        decode = LatentDecoder(spec, latent)
    return LoadedCheckpoint(model.eval(), build_diffusion(spec), spec, int(bundle["step"]), decode)


def _model_with_weights(bundle: dict, source: str, weights: str) -> DiT:
    """The DiT its model_config describes, holding the bundle's `weights`; a config DiT does not take
    or weights of another shape are a CheckpointError naming `source` (on one line)."""
    try:
        model = model_from_config(bundle["model_config"])
    except (TypeError, ValueError) as err:  # an unknown key, a value of the wrong type
        raise CheckpointError(f"checkpoint {source!r}: its model_config does not describe a DiT ({err})") from None
    state = bundle["ema"]["model"] if weights == "ema" else bundle["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:  # torch lists every mismatch, one per line
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"checkpoint {source!r}: its {weights} weights do not match its model_config "
                              f"({first})") from None
    return model


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: every class equally represented."""
    return torch.arange(num) % num_classes


@torch.no_grad()
def generate(ckpt: LoadedCheckpoint, labels: torch.Tensor, sampler: str = "ddim", steps: int = 50,
             guidance: float = 1.0, seed: int = 0, batch_size: int = 100, clip_x0: bool = True,
             progress: bool = False, device: str | torch.device = "cpu",
             captions: list[str] | None = None) -> torch.Tensor:
    """Images in [-1, 1], [N, C, H, W]. Batch i uses a generator seeded by (seed, i), so the
    same call gives the same images. A latent model's samples are decoded to images (its
    predicted x0 is not clipped: latents are not confined to [-1, 1]). A text model draws from
    `captions` (one per image), by default captions of `labels` in phrasings training never saw."""
    model, cfg = ckpt.model.to(device), ckpt.model.config
    if guidance != 1.0 and cfg.class_dropout_prob == 0:
        raise ValueError("guidance needs a model trained with label dropout (model.class_dropout_prob > 0)")
    sample_fn = get_sampler(sampler)
    if getattr(model, "text", None) is not None:
        from ditlab.models.text import caption_inputs

        if captions is None:
            from ditlab.data.captions import CaptionBank, heldout_captions

            captions = CaptionBank([], heldout_captions(ckpt.spec.data)).for_labels(labels)
        labels = caption_inputs(cfg, captions)
    starts = range(0, len(labels), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sampling ({sampler}, {steps} steps, w={guidance})", unit="batch")
    out = []
    for i, start in enumerate(starts):
        y = labels[start : start + batch_size].to(device)
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        x = torch.randn((len(y), cfg.in_channels, cfg.input_size, cfg.input_size), generator=g).to(device)
        denoise = guided_denoiser(model, y, guidance, model.null_class)
        x = sample_fn(denoise, x, ckpt.diffusion, steps, generator=g, clip_x0=clip_x0 and ckpt.decode is None)
        out.append((x if ckpt.decode is None else ckpt.decode(x.cpu())).cpu())
    if out:
        return torch.cat(out)
    channels, size = (cfg.in_channels, cfg.input_size) if ckpt.decode is None else ckpt.decode.image_shape
    return torch.zeros(0, channels, size, size)


def save_pngs(images: torch.Tensor, labels: torch.Tensor, out_dir: str | Path, kind: str = "class") -> list[Path]:
    """One PNG per image, named <index>_<kind><label>.png (kind "prompt": the prompt's index);
    written to a temp name, then renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, label) in enumerate(zip(to_uint8(images), labels.tolist(), strict=True)):
        path = out_dir / f"{i:05d}_{kind}{label}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")
        paths.append(path)
    return paths
