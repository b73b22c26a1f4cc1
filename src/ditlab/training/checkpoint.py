"""The checkpoint bundle: one file with model, EMA, optimizer, step, RNG states and the spec.

Written atomically (temp file in the same folder, then rename), so a crash mid-write leaves the
previous checkpoint intact. Loaded with `weights_only=True`: every field is a tensor or plain data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditlab.atomic import atomic_path

FORMAT = "ditlab-checkpoint/1"
BUNDLE_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("format", "step", "model", "ema", "optimizer", "rng", "spec", "model_config")


class CheckpointError(ValueError):
    pass


def capture_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_bundle(path: str | Path, bundle: dict[str, Any]) -> Path:
    """Write `bundle` to `path` atomically."""
    with atomic_path(path, fsync=True) as tmp:
        torch.save({"format": FORMAT, **bundle}, tmp)
    return Path(path)


def resolve_bundle_path(path: str | Path) -> Path:
    """Accept the bundle file or a checkpoint folder holding it (as Ray Train persists them)."""
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    return path


def load_bundle(path: str | Path) -> dict[str, Any]:
    """Load and check a bundle; a truncated or foreign file is a CheckpointError naming the path."""
    path = resolve_bundle_path(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or corrupt: {err}") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {FORMAT} bundle")
    missing = [k for k in REQUIRED_KEYS if k not in bundle]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}")
    return bundle
