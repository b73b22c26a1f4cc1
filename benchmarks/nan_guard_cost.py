"""Benchmark: what the NaN guard's per-step checks cost the quickstart's 2-rank training step.

    python benchmarks/nan_guard_cost.py [--steps 160] [--rounds 3] [--out FILE]

The training loop (training/loop.py) skips a step whose loss or gradients are NaN or infinite on any
rank: each step it checks every gradient (FiniteStepGuard), all-reduces that verdict unless DDP
averaged every gradient, then all-reduces the loss's. This runs the quickstart's loop on 2 gloo
ranks in this process's children (one thread each, DDP, no Ray: the loop alone) in three variants,
their order reversed every other round:
  "guard":  as shipped;
  "before": the guard of 1 December, patched back in: `torch.isfinite(g).all()` per gradient and
            the verdict all-reduced every step;
  "no guard": both checks patched out.
It prints the median of each run's 20-step images/s windows after the first, and per round the
ratios to "guard". Before that, in this process on one thread, it times the gradient check alone on
the quickstart model's gradients (72 tensors, 1.9M values): `torch.isfinite(g).all()` per gradient
(before) against the shipped `grads_finite` (one sum per gradient), median of 1000 calls. Run it
with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from common import ISSUE_14_MODEL, header, table, time_median

ROOT = Path(__file__).resolve().parents[1]


def worker(rank: int, variant: str, port: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from ditlab.config import load
    from ditlab.training import loop

    if variant == "no guard":
        loop.FiniteStepGuard.cover = lambda self, optimizers: None
        loop.all_ranks = lambda flag, device: flag
    elif variant == "before":
        loop.grads_finite = lambda grads: bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        loop.FiniteStepGuard.distributed = lambda self, wrapped: wrapped  # nothing averaged: all-reduce
    spec = load(str(ROOT / "experiments" / "quickstart.yaml"),
                [ISSUE_14_MODEL, f"train.steps={steps}", "train.checkpoint_every=100000", "train.log_every=20",
                 "train.val_every=100000"])
    rates: list[float] = []

    class Rates:
        def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
            rates.append(metrics["images_per_sec"])

    loop.train(spec, Rates(), loop.Placement(rank=rank, world_size=2, wrap_model=DistributedDataParallel))
    if rank == 0:
        Path(out).write_text(str(statistics.median(rates[1:])))
    dist.destroy_process_group()


def check_alone() -> list[dict]:
    """ms per call of each gradient check on the quickstart model's gradient shapes, one thread."""
    from ditlab.builders import build_dit
    from ditlab.config import load
    from ditlab.training.loop import grads_finite

    torch.set_num_threads(1)
    spec = load(str(ROOT / "experiments" / "quickstart.yaml"), [ISSUE_14_MODEL])
    grads = [torch.randn_like(p) for p in build_dit(spec, num_classes=10).parameters()]  # the digits' 10 classes
    checks = {"isfinite().all() per gradient (before)": lambda: bool(torch.stack([torch.isfinite(g).all()
                                                                                  for g in grads]).all()),
              "one sum per gradient (grads_finite)": lambda: grads_finite(grads)}
    return [{"check": name, "ms per call (median of 1000)": time_median(check, 1000, warmup=10) * 1e3}
            for name, check in checks.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    alone = check_alone()
    print(alone, file=sys.stderr, flush=True)
    variants = ["guard", "before", "no guard"]
    rows = []
    result = Path(tempfile.mkdtemp(prefix="ditlab-nan-guard-")) / "images_per_sec"  # rank 0 writes it
    for r in range(args.rounds):
        row = {"round": r + 1}
        for i, variant in enumerate(variants if r % 2 == 0 else variants[::-1]):
            mp.spawn(worker, args=(variant, 29400 + 3 * r + i, args.steps, str(result)), nprocs=2)
            row[f"{variant} img/s"] = float(result.read_text())
        for variant in variants[1:]:
            row[f"{variant} / guard"] = row[f"{variant} img/s"] / row["guard img/s"]
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    title = "The NaN guard's per-step checks on the quickstart's 2-rank step (loop only, gloo, no Ray)"
    text = (header(title) + "\n" + table(alone, list(alone[0])) + "\n\n" + table(rows, list(rows[0])))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
