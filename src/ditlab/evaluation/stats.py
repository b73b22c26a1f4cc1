"""Cached reference features: the real side of FID is extracted once per dataset version.

The cache key hashes the reference images themselves (so a changed dataset is a new entry), the
resize mode and the weights file; the count is part of the key through the images."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ditlab.atomic import atomic_path
from ditlab.evaluation.features import find_inception_weights, inception_features

RESIZE_MODE = "clean"


def cache_dir() -> Path:
    return Path(os.environ.get("DITLAB_CACHE_DIR", Path.home() / ".cache" / "ditlab")) / "reference"


def reference_key(images_uint8: np.ndarray, weights: str | None = None) -> str:
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(images_uint8).tobytes())
    h.update(f"{images_uint8.shape}|{RESIZE_MODE}|{find_inception_weights(weights).path.name}".encode())
    return h.hexdigest()[:20]


def reference_features(images_uint8: np.ndarray, weights: str | None = None, progress: bool = False) -> np.ndarray:
    """Features of the reference images, from the cache when this exact set was seen before."""
    path = cache_dir() / f"{reference_key(images_uint8, weights)}.npy"
    if path.is_file():
        return np.load(path)
    feats = inception_features(images_uint8, weights=weights, progress=progress)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    return feats
