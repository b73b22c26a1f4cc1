"""Benchmark: what each memory and speed switch of `train` does to step time and peak memory.

    python benchmarks/switches.py [--model DiT-S/2] [--batch 32] [--steps 6]

Each configuration runs the generation task's own training step (GenerationTask.step: diffusion
loss, accumulation, clipping, AdamW) in a fresh process, so that its peak RSS (ru_maxrss) is its
own: fp32 (baseline), bf16 autocast, gradient checkpointing, gradient accumulation in 2 and 4
micro-batches, and torch.compile (its compile time printed apart). Step time is the median of
`--steps` steps after two warm-up steps. On a GPU the script reports peak allocated memory and MFU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import count_flops, header, matmul_peak_gflops, table  # noqa: E402

CONFIGS = {
    "fp32": [],
    "bf16 autocast": ["train.precision=bf16"],
    "grad checkpointing": ["train.grad_checkpointing=true"],
    "grad accumulation 2": ["train.grad_accumulation=2"],
    "grad accumulation 4": ["train.grad_accumulation=4"],
    "torch.compile": ["train.compile=true"],
}


def one(name: str, model: str, batch: int, steps: int) -> dict:
    """Time GenerationTask.step under configuration `name`, in this process."""
    import torch

    from ditlab.config import from_dict
    from ditlab.training.tasks.base import Batch
    from ditlab.training.tasks.generation import GenerationTask

    raw = {"name": "switches", "data": {"source": "digits", "resolution": 32, "channels": 3},
           "model": {"name": model}, "train": {"batch_size": batch, "val_images": 0},
           "resources": {"num_workers": 1}}
    for kv in CONFIGS[name]:
        key, value = kv.split("=")
        raw["train"][key.split(".")[1]] = json.loads(value) if value in ("true", "false") else (
            int(value) if value.isdigit() else value)
    spec = from_dict(raw)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (batch,), generator=g)
    task = GenerationTask(spec, 10, torch.device("cpu"))
    task.wrap(lambda m: m)
    batch_ = Batch(images, labels, torch.arange(batch))

    def step():
        task.step(batch_, torch.Generator().manual_seed(1))

    tic = time.perf_counter()
    step()
    first = time.perf_counter() - tic  # includes torch.compile's compile
    step()
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    seconds = statistics.median(times)
    flops = count_flops(step) if name != "torch.compile" else None
    return {"config": name, "step_ms": 1e3 * seconds, "img_s": batch / seconds, "first_step_s": first,
            "gflops": flops / seconds / 1e9 if flops else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.model, args.batch, args.steps)))
        return
    peak = matmul_peak_gflops()
    rows = []
    for name in args.configs:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--model", args.model, "--batch",
                               str(args.batch), "--steps", str(args.steps)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for row in rows:
        row["speed_vs_fp32"] = base["step_ms"] / row["step_ms"]
        row["rss_vs_fp32"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        if row["gflops"]:
            row["pct_peak"] = 100 * row["gflops"] / peak
    print(header(f"train switches, {args.model} on 32x32x3, batch {args.batch}, GenerationTask.step; "
                 f"matmul peak {peak:.0f} GFLOP/s"))
    print(table(rows, ["config", "step_ms", "img_s", "speed_vs_fp32", "gflops", "pct_peak", "peak_rss_mb",
                       "rss_vs_fp32", "first_step_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
