"""Benchmark: one training step of our DiT against diffusers' DiTTransformer2DModel, side by side.

    python benchmarks/train_step.py [--sizes quickstart DiT-S/4 DiT-S/2 DiT-B/4] [--repeats 5]

Both models are the same network with the same weights (models/convert.py proves it), the same
batch, resolution, AdamW optimizer (ditlab's, fused on CPU) and loss (MSE on the prediction
channels). Each size is timed alternately, ours then diffusers', as the median of `--repeats`
steps after a warm-up step. FLOPs per step come from torch's FlopCounterMode with attention added
(common.count_flops); the share of peak is against a large fp32 matmul measured in the same run on
the same threads. The process keeps the memory it frees, as the `ditlab` command does
(ditlab/allocator.py), for both models alike; DITLAB_KEEP_FREED_MEMORY=0 runs it with glibc's
defaults.

Sizes: "quickstart" is the quickstart's DiT-Ti/4 on 16x16x1 digits at 64 images (one worker's
share of its batch) on one thread, as each of its two Ray workers runs; the DiT paper sizes run on
32x32x4 latents (256px images) at `--batch` on all threads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from common import count_flops, header, matmul_peak_gflops, table, time_median  # noqa: E402

# name -> (preset, resolution, channels, classes, batch or None for --batch, threads or None for all)
SIZES = {"quickstart": ("DiT-Ti/4", 16, 1, 10, 64, 1)}


def size_settings(name: str, batch: int):
    if name in SIZES:
        return SIZES[name]
    return name, 32, 4, 1000, batch, None


def train_step(model, forward, x, t, y, target):
    """A closure doing one optimizer step of `model` through `forward`, with the AdamW every ditlab
    task trains with (fused where the device has it) for both models."""
    from ditlab.training.optim import adamw

    opt = adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    channels = x.shape[1]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(x, t, y)[:, :channels], target)
        loss.backward()
        opt.step()

    return step


def measure(name: str, batch: int, repeats: int) -> dict:
    from ditlab.models import build_model
    from ditlab.models.convert import to_diffusers

    preset, res, channels, classes, batch, threads = size_settings(name, batch)
    torch.set_num_threads(threads or default_threads)
    peak = matmul_peak_gflops()
    torch.manual_seed(0)
    ours = build_model(preset, input_size=res, in_channels=channels, num_classes=classes).train()
    peer = to_diffusers(ours).train()
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(batch, channels, res, res, generator=g), torch.randn(batch, channels, res, res, generator=g)
    t, y = torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, classes, (batch,), generator=g)
    steps = {"ours": train_step(ours, ours, x, t, y, target),
             "diffusers": train_step(peer, lambda x, t, y: peer(x, t, y, return_dict=False)[0], x, t, y, target)}
    flops = count_flops(steps["ours"])
    seconds = {k: [] for k in steps}
    for _ in range(2):  # alternate, so drift on a shared machine hits both
        for k, step in steps.items():
            seconds[k].append(time_median(step, max(1, repeats // 2)))
    row = {"size": name, "model": preset, "input": f"{res}x{res}x{channels}", "batch": batch,
           "threads": torch.get_num_threads(), "gflop_step": flops / 1e9, "peak_gflops": peak}
    for k in steps:
        s = min(seconds[k])
        row.update({f"{k}_ms": 1e3 * s, f"{k}_img_s": batch / s, f"{k}_gflops": flops / s / 1e9,
                    f"{k}_pct_peak": 100 * flops / s / 1e9 / peak})
    row["ours_vs_diffusers"] = row["ours_img_s"] / row["diffusers_img_s"]
    return row


default_threads = torch.get_num_threads()


def main() -> None:
    from ditlab.allocator import keep_freed_memory

    kept = keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["quickstart", "DiT-S/4", "DiT-S/2", "DiT-B/4"])
    parser.add_argument("--batch", type=int, default=32, help="batch of the DiT paper sizes")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = [measure(name, args.batch, args.repeats) for name in args.sizes]
    print(header("training step: ditlab DiT vs diffusers DiTTransformer2DModel (same weights, AdamW, MSE)"))
    print(f"# freed memory kept (ditlab/allocator.py): {'yes' if kept else 'no, glibc defaults'}")
    print(table(rows, ["size", "input", "batch", "threads", "gflop_step", "peak_gflops", "ours_ms", "diffusers_ms",
                       "ours_img_s", "ours_gflops", "ours_pct_peak", "diffusers_pct_peak", "ours_vs_diffusers"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
