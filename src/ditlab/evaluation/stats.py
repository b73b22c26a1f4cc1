"""Cached reference features: the real side of FID is extracted once per dataset version.

The cache key hashes the reference images themselves (so a changed dataset is a new entry), the
resize mode and the SHA-256 of the Inception weights (not their file name: two files of one name
are two entries); the count is part of the key through the images. An entry is checked when read:
its JSON record holds the SHA-256 of the .npy file, and an entry that is truncated, altered or
unreadable is recomputed, saying so on stderr, never used."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from ditlab.atomic import atomic_path, file_digest, write_json
from ditlab.evaluation.features import find_inception_weights, inception_features

FEATURE_DIM = 2048


def cache_dir() -> Path:
    return Path(os.environ.get("DITLAB_CACHE_DIR", Path.home() / ".cache" / "ditlab")) / "reference"


def reference_key(images_uint8: np.ndarray, resize: str, weights: str | None = None) -> str:
    """Hash of the images' bytes (dataset identity and version, image size, sample count), the
    resize mode and the weights' SHA-256."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images_uint8).tobytes())
    h.update(f"{images_uint8.shape}|{resize}|{find_inception_weights(weights).sha256}".encode())
    return h.hexdigest()[:24]


def cached_reference_features(path: Path, count: int) -> np.ndarray | None:
    """The entry at `path` if it is whole and what its record says it is; None (after a note on
    stderr naming the file) when it is damaged, None silently when there is none."""
    import json

    record_path = path.with_suffix(".json")
    if not path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        if file_digest(path) != record.get("features_sha256"):
            raise ValueError("its SHA-256 differs from the one recorded in " + record_path.name)
        feats = np.load(path, allow_pickle=False)
        if feats.shape != (count, FEATURE_DIM) or not np.isfinite(feats).all():
            raise ValueError(f"it holds {feats.shape} features, expected ({count}, {FEATURE_DIM}) finite ones")
        return feats
    except (OSError, ValueError, EOFError) as err:  # json.JSONDecodeError is a ValueError
        print(f"ditlab: reference-feature cache {path} is damaged ({err}); recomputing it", file=sys.stderr)
        return None


def reference_entry(images_uint8: np.ndarray, resize: str = "clean", weights: str | None = None) -> Path:
    """The cache file that holds (or will hold) these images' features."""
    return cache_dir() / f"{reference_key(images_uint8, resize, weights)}.npy"


def store_reference_features(entry: Path, images_uint8: np.ndarray, feats: np.ndarray, resize: str = "clean",
                             weights: str | None = None, describe: str = "") -> None:
    """Writes `feats` as the cache's `entry` for these images, with its JSON record."""
    with atomic_path(entry) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    n, h, w, c = images_uint8.shape
    location = find_inception_weights(weights)
    write_json(entry.with_suffix(".json"), {"reference": describe, "count": n, "image_size": [h, w, c],
                                            "resize": resize, "weights": location.origin,
                                            "weights_sha256": location.sha256, "features_sha256": file_digest(entry)})


def reference_features(images_uint8: np.ndarray, resize: str = "clean", weights: str | None = None,
                       progress: bool = False, describe: str = "") -> np.ndarray:
    """Features of the reference images, from the cache when this exact set was seen before.
    A JSON file beside each entry says what it holds, with the entry's SHA-256."""
    entry = reference_entry(images_uint8, resize, weights)
    feats = cached_reference_features(entry, len(images_uint8))
    if feats is None:
        feats = inception_features(images_uint8, weights=weights, progress=progress, resize=resize)
        store_reference_features(entry, images_uint8, feats, resize, weights, describe)
    return feats
