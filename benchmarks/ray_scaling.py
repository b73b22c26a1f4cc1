"""Benchmark: what Ray Train costs per step, how 1 -> 2 workers scale here, and what scaling to expect
for DiT-XL/2 on a GPU cluster, worked out on paper.

    python benchmarks/ray_scaling.py [--steps 200] [--rounds 3] [--paper-only] [--json FILE]

Three runs of the quickstart model (DiT-Ti/4 on 16x16 digits, 64 images a worker, one thread a
worker), each timed two ways, both leaving out start-up and the first window's warm-up:
  - the training loop's own images/s (the median over its log windows after the first): the steps
    alone, the loop's clock restarting after each report;
  - by the clock: the images between the second report and the last over the seconds between
    them, as the driver received them (MLflow's timestamp of each logged step; in-process, the
    reporter's own): the steps and whatever the reports cost, such as waiting for Ray Train's
    controller to take them (BENCHMARKS.md, "Reports that wait for Ray Train's poll").
  1. in-process: ditlab.training.train, no Ray;
  2. TorchTrainer with 1 worker (`ditlab train`, same loop): Ray Train's overhead is 1 - (2) / (1);
  3. TorchTrainer with 2 workers (global batch 128): DDP's per-worker images/s, and the scaling
     efficiency (2-worker images/s) / (2 x 1-worker images/s).
Each `ditlab train` runs against a throw-away SQLite MLflow store in a temporary folder. The three
runs alternate over `--rounds` rounds, in reverse order every other round; each figure is the
median over the rounds, and the overhead is also printed round by round. Runs of one setting
differed by up to 10% within an hour on this machine, twice the overhead target's 5% (BENCHMARKS.md,
"Where the two-worker run loses time").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import ISSUE_14_MODEL, header, steady_images_per_sec, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "quickstart.yaml"
PER_WORKER_BATCH = 64
LOG_EVERY = 20  # steps between reports


def overrides(steps: int, workers: int) -> list[str]:
    return [ISSUE_14_MODEL, f"train.steps={steps}", f"train.log_every={LOG_EVERY}", f"train.checkpoint_every={steps}",
            "train.val_images=0", "train.eval_every=null", f"train.batch_size={PER_WORKER_BATCH * workers}",
            f"resources.num_workers={workers}", "resources.cpus_per_worker=1"]


def by_the_clock(reports: list[tuple[int, float]], images_per_step: int) -> float:
    """Images/s between the second report and the last: (step, seconds) pairs in step order."""
    (first_step, first_time), (last_step, last_time) = reports[1], reports[-1]
    return (last_step - first_step) * images_per_step / (last_time - first_time)


def in_process(steps: int) -> tuple[float, float]:
    """(the loop's steady images/s, images/s by the clock) for the loop alone, no Ray."""
    import time

    import torch

    from ditlab.config import load
    from ditlab.training import LocalReporter, train

    class Timed(LocalReporter):
        def __init__(self, out_dir):
            super().__init__(out_dir)
            self.times: list[tuple[int, float]] = []

        def report(self, metrics, checkpoint_dir=None, *, checkpoint_step=False):
            self.times.append((int(metrics["step"]), time.perf_counter()))  # as the driver gets it
            super().report(metrics, checkpoint_dir, checkpoint_step=checkpoint_step)

    torch.set_num_threads(1)  # as each Ray worker (cpus_per_worker 1)
    spec = load(SPEC, overrides(steps, 1))
    with tempfile.TemporaryDirectory() as tmp:
        reporter = Timed(tmp)
        train(spec, reporter)
    return steady_images_per_sec(reporter.history), by_the_clock(reporter.times, spec.train.batch_size)


def under_ray(steps: int, workers: int) -> tuple[float, float]:
    """(the loop's steady images/s, images/s by the clock) for `ditlab train` on `workers` workers,
    all workers together."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        sets = [x for kv in overrides(steps, workers) for x in ("--set", kv)]
        proc = subprocess.run([str(Path(sys.executable).parent / "ditlab"), "train", str(SPEC), "--storage", tmp,
                               "--name", "bench", "--no-progress", "--json", *sets],
                              env=env, cwd=tmp, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"ditlab train failed:\n{proc.stderr[-3000:]}")
        history = json.loads((Path(tmp) / "bench" / "history.json").read_text())["history"]
        client = MlflowClient(uri)
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        logged = sorted((m.step, m.timestamp / 1e3) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    return steady_images_per_sec(history), by_the_clock(logged, PER_WORKER_BATCH * workers)


# -- on paper: DiT-XL/2 data-parallel on GPUs ---------------------------------------------------------

PARAMS_XL2 = 675e6            # DiT-XL/2 parameters (DiT paper, table 4: 675M)
GFLOP_FORWARD_XL2 = 2 * 118.6  # per 256px image: 118.6 GMACs (table 1) = 237.2 GFLOP
H100_BF16_DENSE = 989e12       # NVIDIA H100 SXM datasheet, dense bf16
MFU = 0.40                     # an assumed, typical model FLOPs utilisation for a DiT of this size
NVLINK_BUSBW = 360e9           # intra-node NCCL all-reduce bus bandwidth, H100 NVLink (nccl-tests, order of)
IB_BUSBW = 45e9                # inter-node bus bandwidth per GPU, one 400 Gb/s NIC per GPU (order of)


def paper_estimate(per_gpu_batch: int = 32, grad_bytes: int = 4) -> list[dict]:
    """Step time and scaling efficiency of DDP for DiT-XL/2 at 256px, from gradient bytes, ring
    all-reduce traffic 2 (N-1)/N x bytes at the slowest link's bus bandwidth, and compute time at MFU.
    Efficiency assumes no overlap (a lower bound) and full overlap of the all-reduce with backward
    (the upper bound DDP's buckets approach)."""
    compute = 3 * GFLOP_FORWARD_XL2 * 1e9 * per_gpu_batch / (H100_BF16_DENSE * MFU)  # forward + 2x backward
    rows = []
    for gpus, busbw, link in ((8, NVLINK_BUSBW, "NVLink, 1 node"), (64, IB_BUSBW, "InfiniBand, 8 nodes")):
        comm = 2 * (gpus - 1) / gpus * PARAMS_XL2 * grad_bytes / busbw
        rows.append({"gpus": gpus, "link": link, "grad_GB": PARAMS_XL2 * grad_bytes / 1e9, "compute_ms": 1e3 * compute,
                     "allreduce_ms": 1e3 * comm, "eff_no_overlap": compute / (compute + comm),
                     "eff_full_overlap": min(1.0, compute / comm), "img_s_no_overlap":
                     gpus * per_gpu_batch / (compute + comm)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--paper-only", action="store_true", help="print only the GPU-cluster estimate")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of the three runs (medians)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not args.paper_only and (args.steps < 3 * LOG_EVERY or args.rounds < 1):
        parser.error(f"--steps must be at least {3 * LOG_EVERY} (the clock runs from the second report of every "
                     f"{LOG_EVERY} steps to the last) and --rounds at least 1")
    out: dict = {"paper": paper_estimate(), "paper_bf16_grads": paper_estimate(grad_bytes=2)}
    if not args.paper_only:
        # (name, workers, run): each run returns (the loop's images/s, by the clock), all workers together
        runs = [("in-process, 1 thread", 1, lambda: in_process(args.steps)),
                ("TorchTrainer, 1 worker", 1, lambda: under_ray(args.steps, 1)),
                ("TorchTrainer, 2 workers (DDP)", 2, lambda: under_ray(args.steps, 2))]
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in runs}
        for r in range(args.rounds):
            for name, _, run in (runs if r % 2 == 0 else runs[::-1]):
                rounds[name].append(run())
        out["rounds"] = {name: [{"img_s_total": x, "clock_img_s_total": c} for x, c in v] for name, v in rounds.items()}
        medians = [(statistics.median(x for x, _ in rounds[name]), statistics.median(c for _, c in rounds[name]))
                   for name, _, _ in runs]
        out["measured"] = [{"run": name, "img_s_per_worker": x / workers, "img_s_total": x,
                            "clock_img_s_per_worker": c / workers}
                           for (name, workers, _), (x, c) in zip(runs, medians, strict=True)]
        (local, local_clock), (one, one_clock), (two, two_clock) = medians
        out["ray_overhead"] = 1 - one / local
        out["ray_overhead_clock"] = 1 - one_clock / local_clock
        local_rounds, one_rounds = (rounds[name] for name, _, _ in runs[:2])
        out["ray_overhead_clock_by_round"] = [1 - o[1] / i[1] for i, o in zip(local_rounds, one_rounds, strict=True)]
        out["scaling_efficiency_2"] = two / (2 * one)
        out["scaling_efficiency_2_clock"] = two_clock / (2 * one_clock)
        print(header(f"Ray Train overhead and 1 -> 2 worker scaling, quickstart model, {args.steps} steps, "
                     f"medians of {args.rounds} alternated rounds"))
        print(table(out["measured"], ["run", "img_s_per_worker", "img_s_total", "clock_img_s_per_worker"]))
        print(f"Ray Train overhead per step, the loop's clock: {100 * out['ray_overhead']:.1f}%; "
              f"by the clock, reports included: {100 * out['ray_overhead_clock']:.1f}%  (target <= 5%)")
        by_round = " / ".join(f"{100 * x:.1f}%" for x in out["ray_overhead_clock_by_round"])
        print(f"Ray Train overhead by the clock, round by round: {by_round}")
        print(f"2-worker scaling efficiency: {100 * out['scaling_efficiency_2']:.1f}% "
              f"(by the clock: {100 * out['scaling_efficiency_2_clock']:.1f}%)\n")
    print(header("on paper: DiT-XL/2 256px DDP, 32 images per GPU, H100 at 40% MFU"))
    for name in ("paper", "paper_bf16_grads"):
        print(f"## gradients in {'fp32' if name == 'paper' else 'bf16'}")
        print(table(out[name], ["gpus", "link", "grad_GB", "compute_ms", "allreduce_ms", "eff_no_overlap",
                                "eff_full_overlap", "img_s_no_overlap"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
