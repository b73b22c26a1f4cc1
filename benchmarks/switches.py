"""Benchmark: what each memory and speed switch of `train` does to step time and peak memory.

    python benchmarks/switches.py [--model DiT-S/2] [--batch 32] [--steps 6]
    python benchmarks/switches.py --model DiT-Ti/4 --depth 6 --resolution 16 --channels 1 --batch 64 \
        --threads 1 --steps 30    # the quickstart model, as one of its workers runs it

Each configuration runs the generation task's own training step (GenerationTask.step: diffusion
loss, accumulation, clipping, AdamW) in a fresh process, so that its peak RSS (ru_maxrss) is its
own: fp32 (baseline), bf16 autocast, gradient checkpointing, gradient accumulation in 2 and 4
micro-batches, torch.compile (its compile time printed apart), and fp32 matrix products in bf16
(`train.matmul_precision: medium`). Step time is the median of
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
    "matmul precision medium": ["train.matmul_precision=medium"],
}


def one(name: str, model: str, batch: int, steps: int, resolution: int = 32, channels: int = 3,
        depth: int | None = None, threads: int | None = None) -> dict:
    """Time GenerationTask.step under configuration `name`, in this process, as the training loop
    runs it (inside `train.matmul_precision`)."""
    import torch

    from ditlab.config import from_dict
    from ditlab.training.precision import matmul_precision
    from ditlab.training.tasks.base import Batch
    from ditlab.training.tasks.generation import GenerationTask

    if threads:
        torch.set_num_threads(threads)
    raw = {"name": "switches", "data": {"source": "digits", "resolution": resolution, "channels": channels},
           "model": {"name": model, **({"depth": depth} if depth else {})},
           "train": {"batch_size": batch, "val_images": 0}, "resources": {"num_workers": 1}}
    for kv in CONFIGS[name]:
        key, value = kv.split("=")
        raw["train"][key.split(".")[1]] = json.loads(value) if value in ("true", "false") else (
            int(value) if value.isdigit() else value)
    spec = from_dict(raw)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, channels, resolution, resolution, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (batch,), generator=g)
    task = GenerationTask(spec, 10, torch.device("cpu"))
    task.wrap(lambda m: m)
    batch_ = Batch(images, labels, torch.arange(batch))

    def step():
        with matmul_precision(spec.train.matmul_precision, torch.device("cpu")):
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
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--depth", type=int, help="blocks, when not the preset's (the quickstart model: 6)")
    parser.add_argument("--threads", type=int, help="torch threads (the quickstart's workers: 1)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    shape = dict(resolution=args.resolution, channels=args.channels, depth=args.depth, threads=args.threads)
    if args.one:
        print(json.dumps(one(args.one, args.model, args.batch, args.steps, **shape)))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    from ditlab.training.precision import matmul_precision

    with matmul_precision("medium", torch.device("cpu")):
        bf16_peak = matmul_peak_gflops()  # the same product with bf16 multiplies, where the CPU has them
    passed = [f"--{k}={v}" for k, v in shape.items() if v is not None]
    rows = []
    for name in args.configs:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--model", args.model, "--batch",
                               str(args.batch), "--steps", str(args.steps), *passed], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for row in rows:
        row["speed_vs_fp32"] = base["step_ms"] / row["step_ms"]
        row["rss_vs_fp32"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        if row["gflops"]:
            row["pct_peak"] = 100 * row["gflops"] / peak
    size = args.model + (f" with {args.depth} blocks" if args.depth else "")
    print(header(f"train switches, {size} on {args.resolution}x{args.resolution}x{args.channels}, batch {args.batch}, "
                 f"GenerationTask.step; matmul peak {peak:.0f} GFLOP/s fp32 ({bf16_peak:.0f} with "
                 "matmul_precision medium)"))
    print(table(rows, ["config", "step_ms", "img_s", "speed_vs_fp32", "gflops", "pct_peak", "peak_rss_mb",
                       "rss_vs_fp32", "first_step_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
