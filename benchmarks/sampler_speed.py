"""Benchmark: each sampler's time against the network's plain forward passes it is made of.

    python benchmarks/sampler_speed.py [CHECKPOINT] [--runs ddim:20 dpmpp-2m:20 ddpm:50] [--batch 100]

A sampler at N steps with classifier-free guidance costs N forward passes of the network on a batch
of 2B (both guidance branches in one batched forward: `guided_denoiser`), plus its own arithmetic
(the x0/eps algebra, clipping, the solver's update, the noise it draws). This script times, side by
side and alternately, `ditlab.sampling.generate` for B images and the N bare forward passes at batch
2B with the same model, and prints the sampler's overhead over them (the issue's target: at most
10%), images/s, and GFLOP/s against the machine's matmul peak measured in the same run.

Without CHECKPOINT the quickstart's network (experiments/quickstart.yaml) is used with random
weights: the time does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import ISSUE_14_MODEL, count_flops, header, matmul_peak_gflops, table, time_median  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ["ddim:20", "dpmpp-2m:20", "ddim:50", "ddpm:50"]


def load(checkpoint: str | None):
    """A LoadedCheckpoint: the one given, or the quickstart spec's network with random weights."""
    from ditlab.sampling import LoadedCheckpoint, load_for_sampling

    if checkpoint:
        return load_for_sampling(checkpoint)
    from ditlab.builders import build_diffusion, build_dit
    from ditlab.config import load as load_spec

    spec = load_spec(ROOT / "experiments" / "quickstart.yaml", [ISSUE_14_MODEL])
    num_classes = 10  # the digits
    model = build_dit(spec, num_classes).eval()
    return LoadedCheckpoint(model=model, diffusion=build_diffusion(spec), spec=spec, step=0, decode=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="sampler:steps")
    parser.add_argument("--batch", type=int, default=100, help="images per sampling batch (the evaluation's default)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    from ditlab.sampling import generate

    torch.set_num_threads(args.threads)
    ckpt = load(args.checkpoint)
    model, cfg = ckpt.model, ckpt.model.config
    labels = torch.arange(args.batch) % model.null_class
    branches = 1 if args.guidance == 1.0 else 2
    x = torch.randn(branches * args.batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.cat([labels, torch.full_like(labels, model.null_class)])[: len(x)]
    peak = matmul_peak_gflops()

    @torch.no_grad()
    def forward_passes(steps: int) -> None:
        for t in torch.linspace(ckpt.diffusion.num_timesteps - 1, 0, steps).long():
            model(x, t.repeat(len(x)), y)

    flops_per_forward = count_flops(lambda: forward_passes(1))
    rows = []
    for run in args.runs:
        sampler, steps = run.split(":")
        steps = int(steps)

        def sample(sampler: str = sampler, steps: int = steps) -> None:
            generate(ckpt, labels, sampler=sampler, steps=steps, guidance=args.guidance, batch_size=args.batch)

        def bare_passes(steps: int = steps) -> None:
            forward_passes(steps)

        # Alternate the two, so that a slow patch of a shared machine hits both.
        sampled, bare = [], []
        for _ in range(args.repeats):
            sampled.append(time_median(sample, 1, warmup=0 if sampled else 1))
            bare.append(time_median(bare_passes, 1, warmup=0 if bare else 1))
        s, f = sorted(sampled)[len(sampled) // 2], sorted(bare)[len(bare) // 2]
        gflops = flops_per_forward * steps / s / 1e9
        rows.append({"sampler": sampler, "steps": steps, "batch": args.batch, "sample_s": s, "forward_s": f,
                     "overhead_pct": 100 * (s / f - 1), "images_per_s": args.batch / s, "gflop_s": gflops,
                     "pct_peak": 100 * gflops / peak})
        print(f"{run}: {s:.3f} s, forward passes {f:.3f} s", file=sys.stderr)
    what = args.checkpoint or "the quickstart network, random weights"
    print(header(f"sampler speed, {args.batch} images a batch, guidance {args.guidance} ({branches} branches "
                 f"in one forward), {args.threads} threads, matmul peak {peak:.1f} GFLOP/s, {what}"))
    print(table(rows, ["sampler", "steps", "batch", "sample_s", "forward_s", "overhead_pct", "images_per_s",
                       "gflop_s", "pct_peak"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
