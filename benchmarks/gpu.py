"""Benchmark: DiT-XL/2 training throughput on 256px latents (32x32x4) in bf16, on a GPU.

    python benchmarks/gpu.py [--batch 32] [--steps 20] [--compile]
    python benchmarks/gpu.py --tiny          # DiT-N/2 on 8x8x4 on the CPU: proves the script runs

Prints images/s and model FLOPs utilisation (MFU): the step's FLOPs (torch's FlopCounterMode,
attention included) per second over the device's peak. The peak is measured in the same run, as a
large bf16 matmul on the GPU (fp32 on the CPU): a dense-matmul ceiling, not the datasheet figure.
Peak allocated memory is torch.cuda.max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import count_flops, header  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a large square matmul on `device`, the best of 10 after a warm-up."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(12):
        sync(device)
        tic = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - tic)
    return 2 * size**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after 3 warm-up steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    parser.add_argument("--tiny", action="store_true", help="DiT-N/2 on 8x8x4, 2 steps: a CPU smoke run")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from ditlab.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    preset, res, batch, steps = ("DiT-N/2", 8, 4, 2) if args.tiny else ("DiT-XL/2", 32, args.batch, args.steps)
    torch.manual_seed(0)
    model = build_model(preset, input_size=res, in_channels=4, num_classes=1000).to(device).train()
    forward = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, 4, res, res, device=device)
    target = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(x, t, y)
        F.mse_loss(out[:, :4].float(), target).backward()
        opt.step()

    flops = count_flops(step)
    for _ in range(1 if args.tiny else 3):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - tic) / steps
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                       8192 if device.type == "cuda" else 1024)
    figures = {"model": preset, "input": f"{res}x{res}x4", "batch": batch, "device": str(device),
               "dtype": "bf16 autocast", "compile": args.compile, "step_ms": 1e3 * seconds,
               "images_per_s": batch / seconds, "tflop_per_step": flops / 1e12,
               "achieved_tflops": flops / seconds / 1e12, "peak_tflops": peak / 1e12, "mfu": flops / seconds / peak,
               "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    print(header(f"{preset} training step, {figures['input']}, batch {batch}, bf16 autocast on {device}"))
    for key, value in figures.items():
        print(f"{key:20s} {value:.4g}" if isinstance(value, float) else f"{key:20s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
