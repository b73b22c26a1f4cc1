"""Benchmark: sample quality and time of each sampler at its step count, on one trained checkpoint.

    python benchmarks/sampler_quality.py CHECKPOINT [--num 500] [--runs ddpm:250 dpmpp-2m:20:1.5 ...]
        [--seeds 0 1 2 3]

A run is SAMPLER:STEPS, or SAMPLER:STEPS:GUIDANCE (default: the checkpoint's evaluation.guidance).
Every run draws the same class-balanced labels from each seed, and is scored against the
checkpoint's reference split (FID on Inception pool3 features, and conditional accuracy by the
digits classifier when the data is digits). Prints FID (the mean over --seeds: one FID of a few
hundred samples moves by one or two points from seed to seed), its ratio to the first run's (the
baseline: DDPM at 250 steps), sampling seconds and the speed-up over the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import header, table  # noqa: E402

DEFAULT_RUNS = ["ddpm:250", "dpmpp-2m:20", "ddim:20", "ddim:50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--num", type=int, default=500, help="samples per run")
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                        help="sampler:steps[:guidance], the first is the baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds; FID is their mean")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    from ditlab.sampling import load_for_sampling
    from ditlab.training.tasks.generation import score_samples

    ckpt = load_for_sampling(args.checkpoint)
    metrics = ("fid", "conditional_accuracy") if ckpt.spec.data.source == "digits" else ("fid",)
    rows = []
    for run in args.runs:
        sampler, steps, *guidance = run.split(":")
        scale = float(guidance[0]) if guidance else ckpt.spec.evaluation.guidance
        by_seed = []
        for seed in args.seeds:
            ev = ckpt.spec.evaluation.model_copy(update={"sampler": sampler, "steps": int(steps), "guidance": scale,
                                                         "seed": seed, "num_samples": args.num, "metrics": metrics})
            by_seed.append(score_samples(ckpt, ev, progress=True).figures)
        rows.append({"sampler": sampler, "steps": int(steps), "guidance": scale,
                     "fid": statistics.mean(f["fid"] for f in by_seed),
                     "fid_by_seed": [round(f["fid"], 2) for f in by_seed],
                     "accuracy": statistics.mean(f.get("conditional_accuracy", float("nan")) for f in by_seed),
                     "seconds": statistics.median(f["eval_sampling_seconds"] for f in by_seed)})
        base = rows[0]
        rows[-1].update(fid_ratio=rows[-1]["fid"] / base["fid"], speedup=base["seconds"] / rows[-1]["seconds"])
        print(f"{run}: FID {rows[-1]['fid']:.2f} {rows[-1]['fid_by_seed']}", file=sys.stderr)
    print(header(f"sampler quality, {args.num} samples, FID the mean over seeds {args.seeds}, "
                 f"{Path(args.checkpoint).resolve()}"))
    print(table(rows, ["sampler", "steps", "guidance", "fid", "fid_ratio", "accuracy", "seconds", "speedup"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
