"""The checkpoint bundle: one file with model, EMA, optimizer, step, RNG states, the spec (which names
the task) and the task's extra state. The same format for every task.

Written atomically (temp file in the same folder, then rename), so a crash mid-write leaves the
previous checkpoint intact; the bundle, its SHA-256 sidecar and their folder are fsynced. A bundle
that fails its checksum later (storage damage, a bad copy) is refused by name; `corrupt_checkpoints`
and `set_aside` let a resume fall back to the newest checkpoint that passes (`ditlab run
--skip-corrupt-checkpoints`). Loaded with `weights_only=True`: every field is a tensor or plain data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditlab.atomic import atomic_path, file_digest

FORMAT = "ditlab-checkpoint/1"
BUNDLE_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("format", "step", "model", "ema", "optimizer", "rng", "spec", "model_config")
# Optional: "task_state" (a task's extra modules and optimizers; absent before the Task seam).


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


def checksum_path(bundle_path: str | Path) -> Path:
    return Path(f"{bundle_path}.sha256")


def save_bundle(path: str | Path, bundle: dict[str, Any]) -> Path:
    """Write `bundle` to `path` atomically, and its SHA-256 beside it (`<path>.sha256`)."""
    with atomic_path(path, fsync=True) as tmp:
        torch.save({"format": FORMAT, **bundle}, tmp)
        digest = file_digest(tmp)
    with atomic_path(checksum_path(path), fsync=True) as tmp:
        tmp.write_text(f"{digest}  {Path(path).name}\n")
    return Path(path)


def verify_bundle(path: str | Path) -> Path:
    """Check a bundle against the checksum written with it: a file changed or cut short after it was
    saved (a bad copy, a half-pulled cache) is a CheckpointError naming it, before anything loads it.
    Bundles without a checksum file are accepted (they predate it)."""
    path = resolve_bundle_path(path)
    record = checksum_path(path)
    if record.is_file():
        expected = record.read_text().split()[0]
        if file_digest(path) != expected:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its SHA-256 does not match "
                                  f"{record.name}; restore it (e.g. `dvc checkout`) or use an earlier checkpoint")
    return path


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The checkpoint_* folders of a run folder, oldest first."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())


def is_checkpoint(path: str | Path) -> bool:
    """A bundle file, a checkpoint folder, or a run folder holding checkpoint folders."""
    p = Path(path)
    return p.is_file() and p.suffix == ".pt" or (p / BUNDLE_NAME).is_file() or bool(checkpoint_dirs(p))


def resolve_bundle_path(path: str | Path) -> Path:
    """Accept the bundle file, a checkpoint folder holding it (as Ray Train persists them), or a
    run folder (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir() and not (path / BUNDLE_NAME).exists() and checkpoint_dirs(path):
        path = checkpoint_dirs(path)[-1]
    if path.is_dir():
        path = path / BUNDLE_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    return path


def load_bundle(path: str | Path) -> dict[str, Any]:
    """Load and check a bundle; a truncated or foreign file is a CheckpointError naming the path."""
    path = verify_bundle(path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        # One line: torch's own message runs to many, with advice to unpickle code (weights_only=False).
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or corrupt ({type(err).__name__}); ditlab "
                              "loads checkpoints as tensors and plain data only, never pickled code") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {FORMAT} bundle")
    missing = [k for k in REQUIRED_KEYS if k not in bundle]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}")
    return bundle


def corrupt_checkpoints(run_dir: str | Path) -> list[tuple[Path, str]]:
    """The run folder's checkpoint folders that fail their integrity check, with the reason."""
    found = []
    for folder in checkpoint_dirs(run_dir):
        try:
            verify_bundle(folder)
        except CheckpointError as err:
            found.append((folder, str(err)))
    return found


def set_aside(run_dir: str | Path, folders: list[Path], also: list[Path] = ()) -> Path:
    """Move `folders` (and the files in `also`) into <run_dir>/corrupt/<n>/, kept for inspection
    rather than deleted; returns that folder."""
    root = Path(run_dir) / "corrupt"
    dest = root / str(len(list(root.glob("*"))) if root.is_dir() else 0)
    dest.mkdir(parents=True)
    for path in [*folders, *also]:
        path.rename(dest / path.name)
    return dest

