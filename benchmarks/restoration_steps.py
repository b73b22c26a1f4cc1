"""Benchmark: sampling steps and sampler against PSNR, SSIM and time for a restoration checkpoint.

    python benchmarks/restoration_steps.py CHECKPOINT [--num 300] [--steps 2,5,10,25,50] [--out FILE]

Restores the first --num images of the checkpoint's test split (degraded as its evaluation degrades
them) with DDIM (deterministic, eta 0) and DDPM (ancestral) at each step count, EMA weights, and
prints one row per (sampler, steps): PSNR and SSIM against the clean images, milliseconds per image
on this machine, and the baselines' PSNR for scale. Restoring is what `task: restoration` evaluates,
so the rows are the figures `ditlab evaluate` would report with evaluation.steps set to each value.
One step is left out of the default: diffusion.schedules.spaced_timesteps(T, 1) is [0], so a
one-step sampler would start at t = 0 instead of T - 1.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a `task: restoration` checkpoint (file, checkpoint or run folder)")
    parser.add_argument("--num", type=int, default=300, help="test images restored per row")
    parser.add_argument("--steps", default="2,5,10,25,50", help="comma-separated step counts")
    parser.add_argument("--samplers", default="ddim,ddpm")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from ditlab.data import to_uint8
    from ditlab.degradations import Degradation
    from ditlab.evaluation.reconstruction import psnr, ssim
    from ditlab.sampling import from_bundle
    from ditlab.training.checkpoint import load_bundle, resolve_bundle_path
    from ditlab.training.tasks.restoration import baseline_restorations, model_labels, restore, split_pairs

    path = resolve_bundle_path(args.checkpoint)
    ckpt = from_bundle(load_bundle(path), str(path), "ema")
    spec = ckpt.spec
    pairs = split_pairs(spec, spec.evaluation.reference_split, args.num)
    clean = to_uint8(pairs.clean)
    labels = model_labels(ckpt.model, pairs.labels, spec.restoration.class_conditional)
    baselines, notes = baseline_restorations(spec, pairs)
    lines = [f"# {spec.name}: {Degradation.from_spec(spec).describe()}; {spec.model.name}, "
             f"{spec.diffusion.schedule} schedule, {spec.diffusion.prediction} prediction"
             f"{', residual over the conditioning image' if spec.restoration.residual else ''}, step {ckpt.step}; "
             f"{len(pairs)} test images",
             f"# checkpoint: {path}",
             f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
             "(shared with other jobs: times are indicative)",
             f"# baselines: {notes['baselines']}"]
    for name, images in baselines.items():
        pred = to_uint8(images)
        lines.append(f"#   {name:10s} PSNR {psnr(pred, clean):6.2f} dB   SSIM {ssim(pred, clean):.4f}")
    lines.append(f"{'sampler':8s} {'steps':>5s} {'PSNR dB':>8s} {'SSIM':>7s} {'ms/image':>9s}")
    print("\n".join(lines), flush=True)
    for sampler in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            tic = time.perf_counter()
            restored = restore(ckpt.model, ckpt.diffusion, pairs.condition, labels, sampler, steps,
                               spec.evaluation.seed, 100, spec.evaluation.clip_x0, residual=spec.restoration.residual)
            ms = (time.perf_counter() - tic) * 1000 / len(pairs)
            pred = to_uint8(restored)
            row = f"{sampler:8s} {steps:5d} {psnr(pred, clean):8.2f} {ssim(pred, clean):7.4f} {ms:9.2f}"
            print(row, flush=True)
            lines.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
