"""Latent diffusion's data: a dataset encoded by an autoencoder checkpoint, cached on disk as a
shard set (data/shards.py's format, so the same code checks it, loads it and streams it).

    cache/latents/<autoencoder sha256[:16]>-<dataset sha256[:16]>/
        manifest.json          as any shard set's (counts, classes, per shard: count, offset, bytes,
                               sha256), plus dtype float16, layout NHWC, latent_shape [C, H, W],
                               scale_factor and both hashes: the cache's one record
        train/00000.npz ...    "images": float16 posterior means [n, H, W, C], unscaled; "labels"
        test/00000.npz ...

The folder's name is its key: the SHA-256 of the autoencoder's bundle file and of the dataset. For
a source held in memory (digits, an image folder, prepared data) the dataset digest hashes its
images and labels as loaded, both splits; for a source that is itself a shard set it hashes the
source manifest's per-shard checksums (every shard is checked against them as it is read), so no
image is loaded for it. A retrained autoencoder or a changed dataset gets a new folder; an
unchanged pair finds its folder and reuses it. A folder without a latent manifest (a cache of the
older one-file `latents.pt` layout) is not a cache: it is encoded again and replaced.

Latents are stored as float16: half the bytes of float32 (an ImageNet-size cache of 1.28M 4x32x32
latents: 10.5 GB instead of 21 GB), and a small autoencoder's posterior means sit well inside
float16's range (the digits autoencoder's: |z| < 5, rounding error under 0.002, 0.1% of their std).
The scale factor is 1/std of the train latents (Rombach et al. 2022, section 4.3.2), computed from
the float32 latents as they are encoded, so the DiT sees latents of unit variance; latents become
float32 times the scale factor on the batch (`data.shards.to_float`). It is stored in the manifest
and in the generation checkpoint beside the autoencoder's hash.

Encoding reads and writes one shard at a time: a shard source's shards one by one (memory: one
shard, whatever the size of the set), an in-memory source in chunks of the shard size.

`ditlab data encode SPEC` builds the cache (the DVC `encode` stage); `ditlab run` builds it when it
is missing (in the driver when the run streams, else in the workers).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditlab.atomic import file_digest
from ditlab.config import ExperimentSpec
from ditlab.data import ImageDataset, load_dataset
from ditlab.data.shards import (DEFAULT_SHARD_SIZE, MANIFEST, ShardError, load_float_split, load_shard, normalize,
                                read_manifest, to_float, verify_shards, write_shards)
from ditlab.models.autoencoder import Autoencoder
from ditlab.training.checkpoint import CheckpointError, load_bundle, resolve_bundle_path
from ditlab.training.tasks.autoencoder import load_autoencoder

SPLITS = ("train", "test")
CONTENT = "latents"  # the manifest's "content": what tells a latent cache from an image shard set


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


Chunks = Iterator[tuple[torch.Tensor, np.ndarray]]  # (images float [n, C, R, R] in [-1, 1], labels)


@dataclass(frozen=True)
class LatentSource:
    """The dataset a cache encodes: its digest, its classes, and each split in chunks (one shard each)."""

    sha256: str
    classes: list[str]
    chunks: Callable[[str], Chunks]


def latent_source(spec: ExperimentSpec) -> LatentSource:
    """A shard set (`data.format: shards`) is read shard by shard and keyed by its manifest's
    checksums; any other source is loaded in memory, keyed by its images, and cut into chunks."""
    if spec.data.format == "shards":
        location = normalize(spec.data.path)
        manifest = read_manifest(location)
        checksums = {split: [entry["sha256"] for entry in manifest["shards"][split]] for split in SPLITS}

        def shards(split: str) -> Chunks:
            for entry in manifest["shards"][split]:
                images, labels = load_shard(location, entry)
                yield to_float(images, manifest), labels

        digest = hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()
        return LatentSource(digest, list(manifest["classes"]), shards)
    datasets = {split: load_dataset(spec.data, split) for split in SPLITS}

    def chunks(split: str) -> Chunks:
        data = datasets[split]
        for start in range(0, len(data), DEFAULT_SHARD_SIZE):
            yield data.images[start:start + DEFAULT_SHARD_SIZE], data.labels[start:start + DEFAULT_SHARD_SIZE].numpy()

    num_classes = datasets["train"].num_classes
    return LatentSource(dataset_digest(datasets), [str(c) for c in range(num_classes)], chunks)


def cache_dir(spec: ExperimentSpec, autoencoder: LatentAutoencoder, data_sha256: str) -> Path:
    return Path(spec.latent.cache) / f"{autoencoder.sha256[:16]}-{data_sha256[:16]}"


def find_cache(folder: Path) -> dict | None:
    """The manifest of the latent cache in `folder`, or None where there is none (no folder, or one
    of the older latents.pt layout); a corrupt manifest is a ShardError naming it."""
    if not (folder / MANIFEST).is_file():
        return None
    manifest = read_manifest(str(folder))
    return manifest if manifest.get("content") == CONTENT else None


def check_latent_cache(spec: ExperimentSpec, autoencoder: LatentAutoencoder) -> None:
    """Before a run: the spec's latent cache, where written, is intact (every shard's size and
    checksum as data/shards.py checks a data set's). A LatentError names the shard and the fix."""
    folder = cache_dir(spec, autoencoder, latent_source(spec).sha256)
    try:
        manifest = find_cache(folder)
        if manifest is not None:
            verify_shards(str(folder.resolve()), manifest)
    except (ShardError, OSError) as err:
        raise LatentError(f"latent.cache: {err}; delete {str(folder)!r} to encode it again") from None


@torch.no_grad()
def encode_split(model: Autoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model.encode(images[i: i + batch_size]).mean for i in range(0, len(images), batch_size)])


class LatentMoments:
    """Running count, sum and sum of squares of the train latents (float64): their std at the end
    without holding them."""

    def __init__(self):
        self.n, self.total, self.squares = 0, 0.0, 0.0

    def add(self, latents: torch.Tensor) -> None:
        x = latents.double()
        self.n += x.numel()
        self.total += float(x.sum())
        self.squares += float((x * x).sum())

    def std(self) -> float:
        mean = self.total / self.n
        return ((self.squares - self.n * mean * mean) / (self.n - 1)) ** 0.5


def encoded(model: Autoencoder, chunks: Chunks, moments: LatentMoments | None) -> Iterator[tuple[np.ndarray, ...]]:
    """Each chunk's posterior means as a float16 [n, H, W, C] shard, counted into `moments`."""
    for images, labels in chunks:
        latents = encode_split(model, images)
        if moments is not None:
            moments.add(latents)
        half = latents.permute(0, 2, 3, 1).numpy().astype(np.float16)
        if not np.isfinite(half).all():
            raise LatentError(f"latent.autoencoder: its latents reach {float(latents.abs().max()):.3g}, beyond "
                              "float16's range (65504), which the latent cache stores")
        yield half, np.asarray(labels, dtype=np.int64)


def ensure_latent_cache(spec: ExperimentSpec) -> tuple[Path, dict, bool]:
    """(cache folder, its manifest, whether it was reused). Written into a temp folder, then renamed."""
    autoencoder, source = open_autoencoder(spec), latent_source(spec)
    folder = cache_dir(spec, autoencoder, source.sha256)
    manifest = find_cache(folder)
    if manifest is not None:
        return folder, manifest, True
    moments = LatentMoments()

    def record() -> dict:  # after the last shard: the scale factor needs every train latent
        return {"content": CONTENT, "autoencoder": str(autoencoder.path), "autoencoder_sha256": autoencoder.sha256,
                "dataset_sha256": source.sha256, "data": spec.data.model_dump(mode="json"),
                "latent_shape": list(autoencoder.latent_shape), "scale_factor": 1.0 / moments.std()}

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        splits = {split: encoded(autoencoder.model, source.chunks(split), moments if split == "train" else None)
                  for split in SPLITS}
        manifest = write_shards(tmp, splits, source.classes, record, dtype="float16")
        first = install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # renamed away when installed; otherwise what is left of it
    return (folder, first, True) if first is not None else (folder, manifest, False)


def install(tmp: Path, folder: Path) -> dict | None:
    """Rename the cache written in `tmp` to `folder`; the manifest of the cache already there if
    another process installed one first (then `tmp` is dropped)."""
    if (first := find_cache(folder)) is not None:
        return first
    if folder.exists():  # a cache of the older latents.pt layout: replaced, never read
        shutil.rmtree(folder, ignore_errors=True)  # (another worker may be removing it too)
    try:
        tmp.rename(folder)
    except OSError:
        if (first := find_cache(folder)) is None:
            raise
        return first
    return None


def load_latent_split(spec: ExperimentSpec, split: str) -> tuple[ImageDataset, dict]:
    """A split of the cached latents in memory, float32 times the scale factor, as the DiT trains on
    them (the same conversion a streamed batch gets); with the cache's manifest."""
    folder, _, _ = ensure_latent_cache(spec)
    latents, labels, manifest = load_float_split(str(folder.resolve()), split)
    return ImageDataset(latents, labels, int(manifest["num_classes"]), f"latents {folder.name}"), manifest


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
