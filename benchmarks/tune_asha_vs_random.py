"""ASHA against plain random search on the quickstart, with the same sampled trials.

Both sweeps draw their configs from experiments/sweeps/quickstart.yaml with the same search seed, so
trial i has the same hyperparameters in both; random search trains every trial to the end, ASHA
stops the weak ones at its rungs. Compute is counted two ways: worker-seconds (each trial's Tune
wall time times its Train workers, start-up included) and training steps actually run.

    python benchmarks/tune_asha_vs_random.py --trials 8 --steps 200
    python benchmarks/tune_asha_vs_random.py --trials 8 --steps 200 --batch-size 64 --json out.json

Target (issue 5): ASHA's best val_loss within 5% of random search's, with at most 50% of its compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "sweeps" / "quickstart.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8, help="sampled trials per sweep (default 8)")
    p.add_argument("--steps", type=int, default=200, help="training steps of a full trial (default 200)")
    p.add_argument("--val-every", type=int, help="steps between validation losses (default: steps / 8)")
    p.add_argument("--grace", type=int, help="ASHA grace period in steps (default: steps / 8)")
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, help="global batch (default: the quickstart's)")
    p.add_argument("--seed", type=int, default=0, help="search seed, the same for both sweeps")
    p.add_argument("--storage", default="sweeps/benchmark", help="where both sweeps are kept")
    p.add_argument("--address", help="Ray cluster to join (default: a local instance)")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


def overrides(args, scheduler: str) -> list[str]:
    every = args.val_every or max(1, args.steps // 8)
    sets = [f"train.steps={args.steps}", f"train.val_every={every}", f"train.log_every={every}",
            f"train.checkpoint_every={args.steps}", f"sweep.num_samples={args.trials}",
            f"sweep.search.seed={args.seed}", f"sweep.name=bench-{scheduler}"]
    if args.batch_size:
        sets.append(f"train.batch_size={args.batch_size}")
    if scheduler == "asha":
        grace = args.grace or every
        sets.append(f"sweep.scheduler={{type: asha, grace_period: {grace}, reduction_factor: {args.reduction_factor}}}")
    else:
        sets.append("sweep.scheduler={type: none}")
    return sets


def run(args, scheduler: str) -> dict:
    from ditlab.orchestration.tune import run_sweep
    from ditlab.sweep import load_sweep

    sweep = load_sweep(SWEEP, overrides(args, scheduler))
    name = f"bench-{scheduler}-{time.strftime('%Y%m%d-%H%M%S')}"
    tic = time.perf_counter()
    summary = run_sweep(sweep, address=args.address, storage_path=args.storage, name=name, progress=False)
    summary["wall_seconds"] = time.perf_counter() - tic
    return summary


def figures(summary: dict) -> dict:
    best = summary["best"] or {}
    return {"best_val_loss": best.get("val_loss"), "best_trial": best.get("trial_id"),
            "worker_seconds": summary["worker_seconds"], "steps_trained": summary["steps_trained"],
            "wall_seconds": summary["wall_seconds"], "states": summary["states"], "sweep_dir": summary["sweep_dir"]}


def same_trials(a: dict, b: dict) -> bool:
    configs = [[t["config"] for t in sorted(s["trials"], key=lambda t: t["trial_id"][-5:])] for s in (a, b)]
    return configs[0] == configs[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    from ditlab.orchestration.ray_session import ensure_ray

    ensure_ray(args.address)
    results = {scheduler: run(args, scheduler) for scheduler in ("random", "asha")}
    rnd, asha = figures(results["random"]), figures(results["asha"])
    loss_ratio = asha["best_val_loss"] / rnd["best_val_loss"]
    ws_ratio = asha["worker_seconds"] / rnd["worker_seconds"]
    steps_ratio = asha["steps_trained"] / rnd["steps_trained"]
    report = {"trials": args.trials, "steps": args.steps, "seed": args.seed,
              "same_trials": same_trials(results["random"], results["asha"]),
              "random": rnd, "asha": asha,
              "best_loss_ratio": loss_ratio, "worker_seconds_ratio": ws_ratio, "steps_ratio": steps_ratio,
              "meets_target": loss_ratio <= 1.05 and ws_ratio <= 0.5}
    print(f"\n{args.trials} trials x {args.steps} steps, search seed {args.seed}, "
          f"same sampled trials: {report['same_trials']}")
    print(f"{'':8s} {'best val_loss':>14s} {'worker-s':>10s} {'steps':>7s} {'wall s':>8s}  states")
    for label, f in (("random", rnd), ("asha", asha)):
        print(f"{label:8s} {f['best_val_loss']:14.5f} {f['worker_seconds']:10.0f} {f['steps_trained']:7d} "
              f"{f['wall_seconds']:8.0f}  {f['states']}")
    print(f"ASHA / random: best loss x{loss_ratio:.3f}, worker-seconds x{ws_ratio:.2f}, steps x{steps_ratio:.2f}")
    print(f"target (loss within 5%, at most 50% of the worker-seconds): "
          f"{'met' if report['meets_target'] else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
