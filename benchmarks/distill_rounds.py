"""Benchmark: distillation settings against training time and the students' FID, in one process.

    python benchmarks/distill_rounds.py TEACHER --variant "NAME:KEY=VALUE;KEY=VALUE" ... [--num 300] [--seeds 0]
        [--out FILE]

Each variant is experiments/distill.yaml with the teacher TEACHER, two rounds (a guided 16-step
teacher, students of 8 and 4 steps), no teacher comparison, one worker in this process (all its
threads), and the variant's `--set`-style assignments on top, e.g.

    python benchmarks/distill_rounds.py runs/quickstart \\
        --variant "reuse 1:distillation.round_steps=[400, 400];distillation.target_reuse=1" \\
        --variant "reuse 4:distillation.round_steps=[400, 400];distillation.target_reuse=4"

It trains each variant with the training loop ditlab runs (`ditlab.training.train`) and prints one
row per variant: the training seconds and, for each round's student, FID, KID and conditional
accuracy of --num samples against the test split, from the run's own evaluation
(`DistillationTask.evaluate_checkpoint`), averaged over the evaluation --seeds. The training time is
the loop's own: compare variants of one run, with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ["distillation.steps=4", "distillation.rounds=2", "distillation.compare_teacher_steps=[]",
        "evaluation.steps=4", "resources.num_workers=1", "train.log_every=100"]


def variant(text: str) -> tuple[str, list[str]]:
    name, _, assignments = text.partition(":")
    return name.strip(), [a.strip() for a in assignments.split(";") if a.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="a generation run folder, checkpoint folder or checkpoint.pt")
    parser.add_argument("--variant", action="append", required=True, type=variant,
                        help="NAME:KEY=VALUE;KEY=VALUE (the spec's train.steps follows round_steps when set)")
    parser.add_argument("--num", type=int, default=300, help="samples per student")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="evaluation seeds; each figure is their mean (the FID of 300 samples moves by one or "
                             "two points from seed to seed)")
    parser.add_argument("--out", help="also write the rows as JSON to this file")
    args = parser.parse_args()

    from ditlab.config import load
    from ditlab.evaluation.suite import dataset_reference
    from ditlab.training import LocalReporter, train
    from ditlab.training.checkpoint import load_bundle
    from ditlab.training.tasks.distillation import DistillationTask

    rows, reference = [], None
    for name, assignments in args.variant:
        overrides = [f"distillation.teacher={args.teacher}", *BASE, *assignments]
        steps = [a.split("=", 1)[1] for a in assignments if a.startswith("distillation.round_steps=")]
        if steps and not any(a.startswith("train.steps=") for a in assignments):
            overrides.append(f"train.steps={sum(json.loads(steps[-1]))}")
        spec = load(ROOT / "experiments" / "distill.yaml", overrides)
        reference = reference or dataset_reference(spec.data, spec.evaluation.reference_split)
        with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
            reporter = LocalReporter(Path(tmp))
            tic = time.perf_counter()
            train(spec, reporter)
            seconds = time.perf_counter() - tic
            bundle = load_bundle(reporter.latest_checkpoint)
        row = {"variant": name, "set": assignments, "train_seconds": round(seconds, 1), "seeds": args.seeds}
        by_seed = []
        for seed in args.seeds:
            ev = spec.evaluation.model_copy(update={"num_samples": args.num, "seed": seed})
            by_seed.append(DistillationTask.evaluate_checkpoint(bundle, name, ev, reference=reference).figures)
        for k in sorted((k for k in by_seed[0] if k.startswith("student_")), key=lambda k: -int(k.split("_")[1])):
            if k.split("/")[1] in ("fid", "kid", "conditional_accuracy"):
                row[k] = round(statistics.mean(f[k] for f in by_seed), 4)  # the mean over --seeds
                if k.endswith("/fid"):
                    row[k + "_by_seed"] = [round(f[k], 2) for f in by_seed]
        rows.append(row)
        print(json.dumps(row), flush=True)

    keys = [k for k in rows[0] if k.startswith("student_") and not k.endswith("_by_seed")]
    print(f"\n{'variant':<24} {'train s':>8} " + " ".join(keys))
    for row in rows:
        cells = " ".join(f"{row.get(k, '-'):>{len(k)}}" for k in keys)
        print(f"{row['variant']:<24} {row['train_seconds']:>8} {cells}")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"{args.num} samples a student against the test split, mean over seeds {args.seeds}; teacher {args.teacher}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "teacher": args.teacher, "num": args.num}, indent=1))


if __name__ == "__main__":
    main()
