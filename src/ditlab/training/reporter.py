"""How the training loop talks to the outside world, without knowing what is outside.

The orchestrator supplies a Reporter (Ray Train's report, or a local one in tests and notebooks)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None, *,
               checkpoint_step: bool = False) -> None:
        """Called by every rank at each log or checkpoint step; `checkpoint_step` on every rank at
        checkpoint steps, `checkpoint_dir` only on rank 0 there. The folder is temporary: the
        reporter must copy it."""


class LocalReporter:
    """Keeps metrics in memory and copies checkpoints to `out_dir/checkpoint_<step>`."""

    def __init__(self, out_dir: str | Path | None = None):
        self.out_dir = Path(out_dir) if out_dir else None
        self.history: list[dict[str, float]] = []
        self.checkpoints: list[Path] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None, *,
               checkpoint_step: bool = False) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir and self.out_dir:
            dest = self.out_dir / f"checkpoint_{int(metrics['step']):06d}"
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            self.checkpoints.append(dest)

    @property
    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None
