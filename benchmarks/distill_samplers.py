"""Benchmark: a distillation run's students and its teacher under each sampler, over several seeds.

    python benchmarks/distill_samplers.py RUN [--student-steps 8 4 2] [--teacher-steps 8 20 50]
        [--seeds 0 1 2 3] [--num 300] [--out FILE]

RUN is a distillation run folder or checkpoint (e.g. runs/distill). Each round's student (the
checkpoint keeps one per step count) is sampled with both student samplers (`ddim-trailing-stochastic`
and `ddim-trailing`); the teacher (`distillation.teacher`) with DDIM, DDPM and DPM-Solver++(2M)
at the distilled guidance. Every row is the FID, KID and conditional accuracy of --num samples
against the run's reference split, as the run's own evaluation scores them (`score_samples`), once
per seed: the FID of 300 samples moves by one or two points from seed to seed, so compare means.
The sampling seconds are printed too, but they are only comparable within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

TEACHER_SAMPLERS = ("ddim", "ddpm", "dpmpp-2m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a distillation run folder, checkpoint folder or checkpoint.pt")
    parser.add_argument("--student-steps", type=int, nargs="*", default=[8, 4, 2])
    parser.add_argument("--teacher-steps", type=int, nargs="*", default=[8, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--num", type=int, default=300, help="samples per row")
    parser.add_argument("--out", help="also write the rows as JSON to this file")
    args = parser.parse_args()

    from ditlab.config import STUDENT_SAMPLERS
    from ditlab.evaluation.suite import dataset_reference
    from ditlab.sampling import from_bundle, load_for_sampling
    from ditlab.training.checkpoint import load_bundle, resolve_bundle_path
    from ditlab.training.tasks.distillation import distilled_guidance, round_students
    from ditlab.training.tasks.generation import score_samples

    path = resolve_bundle_path(args.run)
    bundle = load_bundle(path)
    final = from_bundle(bundle, str(path), "ema")
    spec = final.spec
    ev = spec.evaluation.model_copy(update={"num_samples": args.num, "inspect_samples": 0,
                                            "metrics": ("fid", "kid", "conditional_accuracy")})
    reference = dataset_reference(spec.data, ev.reference_split)
    students = {**round_students(bundle, final), spec.distillation.steps: final}  # final: the last round's
    teacher = load_for_sampling(spec.distillation.teacher)
    guidance = distilled_guidance(spec, teacher.spec)

    cases = [("student", s, sampler, students[s], 1.0) for s in args.student_steps for sampler in STUDENT_SAMPLERS]
    cases += [("teacher", s, sampler, teacher, guidance) for s in args.teacher_steps for sampler in TEACHER_SAMPLERS]
    rows = []
    for model, steps, sampler, ckpt, scale in cases:
        row = {"model": model, "steps": steps, "sampler": sampler, "fid": [], "kid": [], "conditional_accuracy": [],
               "seconds_per_100": []}
        for seed in args.seeds:
            settings = {"sampler": sampler, "steps": steps, "guidance": scale, "seed": seed}
            figures = score_samples(ckpt, ev.model_copy(update=settings), reference).figures
            for key in ("fid", "kid", "conditional_accuracy"):
                row[key].append(round(figures[key], 4))
            row["seconds_per_100"].append(round(100 * figures["eval_sampling_seconds"] / args.num, 3))
        row["fid_mean"] = round(statistics.mean(row["fid"]), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'model':<8} {'steps':>5} {'sampler':<25} {'FID mean':>8}  FID by seed {args.seeds}  accuracy (mean)  "
          "s / 100 images (median)")
    for r in rows:
        fids = " / ".join(f"{f:.2f}" for f in r["fid"])
        print(f"{r['model']:<8} {r['steps']:>5} {r['sampler']:<25} {r['fid_mean']:>8}  {fids}  "
              f"{statistics.mean(r['conditional_accuracy']):.3f}  {statistics.median(r['seconds_per_100']):.2f}")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; {args.num} "
          f"samples a row against the {ev.reference_split} split; run {args.run}; teacher {spec.distillation.teacher}, "
          f"guidance {guidance}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "run": args.run, "seeds": args.seeds, "num": args.num},
                                             indent=1))


if __name__ == "__main__":
    main()
