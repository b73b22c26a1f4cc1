"""Benchmark: what an MLflow dashboard costs the machine a training run shares with it.

    python benchmarks/dashboard_cost.py [--steps 400] [--rounds 3] [--settle 20] [--out FILE]

The README has users open `mlflow ui` beside their runs, and the tests run `mlflow server`. Since
MLflow 3 both also start a job-execution back end (a job runner and Huey consumers for MLflow's
GenAI jobs, which ditlab never submits) unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION is false; those
processes start after the dashboard answers and then poll. This trains the quickstart in this
process (the loop alone, no Ray, all threads) in three variants, their order reversed every other
round:
  "none":           no dashboard running;
  "ui, jobs on":    `mlflow ui` on a fresh SQLite store, MLflow's default;
  "ui, jobs off":   the same with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, as the README says.
Per run it prints the seconds until the dashboard answers /health; the CPU seconds its processes
use in the --settle seconds after that, while nothing else runs and nothing talks to it (the job
consumers start then); their count and memory (unique set size) after settling; then the median of
the training run's 20-step images/s windows after the first, its ratio to "none", and the CPU the
dashboard used meanwhile, as a share of one core. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import torch

from common import header, table

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {"none": None, "ui, jobs on": "true", "ui, jobs off": "false"}


def start_ui(root: Path, jobs: str) -> tuple[subprocess.Popen, float]:
    """`mlflow ui` on 127.0.0.1 over a new SQLite store in `root`, answering /health; and the
    seconds it took to answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": jobs}
    store = f"sqlite:///{root / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store,
                             "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, time.monotonic() - started
        except OSError:
            if proc.poll() is not None or time.monotonic() > started + 120:
                raise RuntimeError("mlflow ui did not answer") from None
            time.sleep(0.2)


def tree_usage(proc: subprocess.Popen | None) -> tuple[float, int, float]:
    """User + system CPU seconds of `proc` and its descendants so far, how many there are, and
    their memory in MB (unique set size: what would be freed without them)."""
    if proc is None:
        return 0.0, 0, 0.0
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    cpu = memory = 0.0
    for p in procs:
        try:
            cpu += sum(p.cpu_times()[:2])
            memory += p.memory_full_info().uss / 2**20
        except psutil.NoSuchProcess:
            pass
    return cpu, len(procs), memory


def train_rate(steps: int) -> float:
    """Median images/s of the quickstart's 20-step windows after the first, in this process."""
    from ditlab.config import load
    from ditlab.training import loop

    spec = load(str(ROOT / "experiments" / "quickstart.yaml"),
                [f"train.steps={steps}", "train.checkpoint_every=100000", "train.log_every=20",
                 "train.val_every=100000"])
    rates: list[float] = []

    class Rates:
        def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
            rates.append(metrics["images_per_sec"])

    loop.train(spec, Rates(), loop.Placement())
    return statistics.median(rates[1:])


def run(variant: str, steps: int, settle: float) -> dict:
    jobs = VARIANTS[variant]
    with tempfile.TemporaryDirectory(prefix="ditlab-dashboard-cost-") as root:
        proc, answered = start_ui(Path(root), jobs) if jobs else (None, 0.0)
        try:
            start_cpu, _, _ = tree_usage(proc)
            time.sleep(settle if proc else 0)
            before, count, memory = tree_usage(proc)
            tic = time.perf_counter()
            rate = train_rate(steps)
            seconds = time.perf_counter() - tic
            after, _, _ = tree_usage(proc)
        finally:
            if proc is not None:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
    return {"answers after s": answered, "CPU s settling": before - start_cpu, "processes": count,
            "MB": memory, "img/s": rate, "CPU s training": after - before,
            "share of a core training": (after - before) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds the dashboard idles before training")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    train_rate(40)  # imports and first-run costs outside the timed runs
    names = list(VARIANTS)
    rows = []
    for r in range(args.rounds):
        results = {}
        for variant in names if r % 2 == 0 else names[::-1]:
            results[variant] = run(variant, args.steps, args.settle)
            print(r + 1, variant, results[variant], file=sys.stderr, flush=True)
        for variant in names:
            rows.append({"round": r + 1, "variant": variant, **results[variant],
                         "img/s / none": results[variant]["img/s"] / results["none"]["img/s"]})
    medians = [{"variant": v, "median img/s / none": statistics.median(x["img/s / none"] for x in rows
                                                                     if x["variant"] == v),
                **{f"median {k}": statistics.median(x[k] for x in rows if x["variant"] == v)
                   for k in ("answers after s", "CPU s settling", "MB", "share of a core training")}}
               for v in names]
    title = f"An idle `mlflow ui` beside quickstart training ({args.steps} steps, {torch.get_num_threads()} threads)"
    text = header(title) + "\n" + table(rows, list(rows[0])) + "\n\n" + table(medians, list(medians[0]))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
