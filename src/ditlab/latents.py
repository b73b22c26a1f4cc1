"""Latent diffusion's data: a dataset encoded by an autoencoder checkpoint, cached on disk.

    cache/latents/<autoencoder sha256[:16]>-<dataset sha256[:16]>/
        latents.pt   {"train": {"latents", "labels"}, "test": {...}}  posterior means, unscaled
        meta.json    both hashes, shapes, num_classes, scale_factor

The folder's name is its key: the SHA-256 of the autoencoder's bundle file and of the dataset as
loaded (its images and labels, both splits). A retrained autoencoder or a changed dataset gets a new
folder; an unchanged pair finds its folder and reuses it. The scale factor is 1/std of the train
latents (Rombach et al. 2022, section 4.3.2), so the DiT sees latents of unit variance; it is
stored in meta.json and in the generation checkpoint beside the autoencoder's hash.

`ditlab data encode SPEC` builds the cache (the DVC `encode` stage); `ditlab run` builds it before
the workers start when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditlab.atomic import file_digest, write_json
from ditlab.config import ExperimentSpec
from ditlab.data import ImageDataset, load_dataset
from ditlab.models.autoencoder import Autoencoder
from ditlab.training.checkpoint import CheckpointError, load_bundle, resolve_bundle_path
from ditlab.training.tasks.autoencoder import load_autoencoder

SPLITS = ("train", "test")


class LatentError(ValueError):
    """An autoencoder that cannot serve a latent spec; the message names the field."""


@dataclass(frozen=True)
class LatentAutoencoder:
    """An autoencoder checkpoint as a latent spec uses it."""

    path: Path
    sha256: str
    model: Autoencoder

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return c.latent_channels, c.latent_size, c.latent_size


def open_autoencoder(spec: ExperimentSpec) -> LatentAutoencoder:
    """`latent.autoencoder` loaded and checked against the spec's data; LatentError names the field."""
    source = spec.latent.autoencoder
    try:
        path = resolve_bundle_path(source)
        bundle = load_bundle(path)
    except CheckpointError as err:
        raise LatentError(f"latent.autoencoder: {err}") from None
    try:
        model = load_autoencoder(bundle, source)
    except ValueError as err:
        raise LatentError(f"latent.autoencoder: {err}") from None
    config, data = bundle["model_config"], spec.data
    if config["in_channels"] != data.channels or config["input_size"] != data.resolution:
        raise LatentError(f"latent.autoencoder: {source!r} encodes {config['input_size']}px images with "
                          f"{config['in_channels']} channels; data is {data.resolution}px with {data.channels}")
    if spec.latent.channels is not None and spec.latent.channels != config["latent_channels"]:
        raise LatentError(f"latent.channels: {spec.latent.channels} does not match the "
                          f"{config['latent_channels']} latent channels of {source!r}")
    return LatentAutoencoder(path, file_digest(path), model)


def dataset_digest(splits: dict[str, ImageDataset]) -> str:
    """SHA-256 of the dataset as training loads it: both splits' uint8 images and labels."""
    h = hashlib.sha256()
    for split in SPLITS:
        data = splits[split]
        h.update(data.to_uint8().tobytes())
        h.update(data.labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def cache_dir(spec: ExperimentSpec, autoencoder: LatentAutoencoder, data_sha256: str) -> Path:
    return Path(spec.latent.cache) / f"{autoencoder.sha256[:16]}-{data_sha256[:16]}"


@torch.no_grad()
def encode_split(model: Autoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model.encode(images[i: i + batch_size]).mean for i in range(0, len(images), batch_size)])


def ensure_latent_cache(spec: ExperimentSpec) -> tuple[Path, dict, bool]:
    """(cache folder, its meta, whether it was reused). Built into a temp folder, then renamed."""
    datasets = {split: load_dataset(spec.data, split) for split in SPLITS}
    autoencoder, data_sha256 = open_autoencoder(spec), dataset_digest(datasets)
    folder = cache_dir(spec, autoencoder, data_sha256)
    if (folder / "meta.json").is_file() and (folder / "latents.pt").is_file():
        return folder, json.loads((folder / "meta.json").read_text()), True
    splits = {split: {"latents": encode_split(autoencoder.model, data.images), "labels": data.labels}
              for split, data in datasets.items()}
    num_classes = datasets["train"].num_classes
    meta = {
        "autoencoder": str(autoencoder.path), "autoencoder_sha256": autoencoder.sha256,
        "dataset_sha256": data_sha256, "data": spec.data.model_dump(mode="json"),
        "latent_shape": list(autoencoder.latent_shape), "num_classes": num_classes,
        "scale_factor": 1.0 / float(splits["train"]["latents"].std()),
        "counts": {split: len(v["labels"]) for split, v in splits.items()},
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        torch.save(splits, tmp / "latents.pt")
        write_json(tmp / "meta.json", meta)
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():  # not another process that got there first
            raise
    return folder, meta, False


def load_latent_split(spec: ExperimentSpec, split: str) -> tuple[ImageDataset, dict]:
    """A split of the cached latents, multiplied by the scale factor, as the DiT trains on them."""
    folder, meta, _ = ensure_latent_cache(spec)
    part = torch.load(folder / "latents.pt", weights_only=True)[split]
    latents = part["latents"] * meta["scale_factor"]
    return ImageDataset(latents.contiguous(), part["labels"], meta["num_classes"], f"latents {folder.name}"), meta


class LatentDecoder:
    """Latents as the DiT samples them -> images in [-1, 1], with the autoencoder a checkpoint was
    trained on. Another autoencoder at that path is an error naming both hashes."""

    def __init__(self, spec: ExperimentSpec, recorded: dict):
        self.autoencoder = open_autoencoder(spec)
        if self.autoencoder.sha256 != recorded["autoencoder_sha256"]:
            raise LatentError(f"latent.autoencoder: {spec.latent.autoencoder!r} has SHA-256 "
                              f"{self.autoencoder.sha256[:16]}..., but this model was trained on the latents of "
                              f"{recorded['autoencoder_sha256'][:16]}...; sample with that autoencoder")
        self.scale_factor = float(recorded["scale_factor"])
        config = self.autoencoder.model.config
        self.image_shape = (config.in_channels, config.input_size)  # what an empty batch decodes to

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.model.decode(latents / self.scale_factor).clamp(-1, 1)
