"""Cached reference features: the real side of FID is extracted once per dataset version.

The cache key hashes the reference images themselves (so a changed dataset is a new entry), the
resize mode and the weights file; the count is part of the key through the images."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ditlab.atomic import atomic_path, write_json
from ditlab.evaluation.features import find_inception_weights, inception_features

def cache_dir() -> Path:
    return Path(os.environ.get("DITLAB_CACHE_DIR", Path.home() / ".cache" / "ditlab")) / "reference"


def reference_key(images_uint8: np.ndarray, resize: str, weights: str | None = None) -> str:
    """Hash of the images' bytes (dataset identity and version, image size, sample count), the
    resize mode and the weights file."""
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(images_uint8).tobytes())
    h.update(f"{images_uint8.shape}|{resize}|{find_inception_weights(weights).path.name}".encode())
    return h.hexdigest()[:20]


def reference_features(images_uint8: np.ndarray, resize: str = "clean", weights: str | None = None,
                       progress: bool = False, describe: str = "") -> np.ndarray:
    """Features of the reference images, from the cache when this exact set was seen before.
    A JSON file beside each entry says what it holds."""
    key = reference_key(images_uint8, resize, weights)
    path = cache_dir() / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    feats = inception_features(images_uint8, weights=weights, progress=progress, resize=resize)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    n, h, w, c = images_uint8.shape
    write_json(path.with_suffix(".json"), {"reference": describe, "count": n, "image_size": [h, w, c],
                                           "resize": resize, "weights": find_inception_weights(weights).origin})
    return feats
