"""Fault-injection hooks, for the fault tests and scripts/fault_report.py only.

Each hook is off unless its environment variable is set; a normal run never sets them. They make
real faults happen inside the real training loop, so the tests exercise the same recovery paths a
crashed GPU worker or a bad batch would:

    DITLAB_FAULT_EXIT_AT_STEP=N     the process exits (os._exit, no cleanup) once step N is trained
                                    and reported: a worker crash
    DITLAB_FAULT_NAN_AT_STEPS=3,5-7 the batch of those steps is all NaN: a non-finite loss and gradient
    DITLAB_FAULT_STEP_SECONDS=S     every step takes at least S seconds: a test that must act
                                    mid-run (kill the driver, stop the tracking server) gets time to
    DITLAB_FAULT_RANK=R             the rank these faults hit (default 0)
    DITLAB_FAULT_MARKER=PATH        the exit fires only while PATH does not exist and creates it
                                    first, so a restarted worker group gets past step N

Under Ray Train the driver forwards every DITLAB_FAULT_* variable to the workers
(orchestration/trainer.py), which run in processes of their own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PREFIX = "DITLAB_FAULT_"
EXIT_CODE = 75


def fault_environment() -> dict[str, str]:
    """This process's DITLAB_FAULT_* variables, for forwarding to the Ray Train workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}


def _targets(rank: int) -> bool:
    return rank == int(os.environ.get(f"{PREFIX}RANK", "0"))


def parse_steps(text: str) -> set[int]:
    """"3,5-7" -> {3, 5, 6, 7}."""
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


def poison_batch(images: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """The batch of (1-based) `step`, all NaN when DITLAB_FAULT_NAN_AT_STEPS names it for this rank."""
    steps = os.environ.get(f"{PREFIX}NAN_AT_STEPS")
    if steps and _targets(rank) and step in parse_steps(steps):
        return torch.full_like(images, float("nan"))
    return images


def maybe_exit(rank: int, step: int) -> None:
    """Exit this process at once, as a crash would, when DITLAB_FAULT_EXIT_AT_STEP names `step`."""
    at = os.environ.get(f"{PREFIX}EXIT_AT_STEP")
    if not at or int(at) != step or not _targets(rank):
        return
    marker = os.environ.get(f"{PREFIX}MARKER")
    if marker:
        if Path(marker).exists():
            return
        Path(marker).touch()
    os._exit(EXIT_CODE)


def pace() -> None:
    """Sleep DITLAB_FAULT_STEP_SECONDS (every rank): steps slow enough to act on mid-run."""
    seconds = float(os.environ.get(f"{PREFIX}STEP_SECONDS", "0"))
    if seconds > 0:
        time.sleep(seconds)
