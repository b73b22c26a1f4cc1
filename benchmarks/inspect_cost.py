"""What the interpretability figures (interpret.py) add to a checkpoint's evaluation, in seconds.

Traces `evaluation.inspect_samples` samples of the checkpoint with its own evaluation settings and
writes the three figures, `--repeats` times, then times the evaluation's own sampling (its
`evaluation.num_samples` images) in the same process, so both figures share the machine's load.

    python benchmarks/inspect_cost.py runs/quickstart --json benchmarks/results/inspect_cost-DATE.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ditlab.interpret import report_plots
from ditlab.sampling import balanced_labels, generate, load_for_sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a generation checkpoint or run folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    ckpt = load_for_sampling(args.checkpoint)
    ev = ckpt.spec.evaluation
    result = {"checkpoint": args.checkpoint, "inspect_samples": ev.inspect_samples, "interpret_seconds": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            tic = time.perf_counter()
            for stem, write in report_plots(ckpt, ev, ev.inspect_samples or 3).items():
                write(Path(folder) / f"{stem}.png")
            result["interpret_seconds"].append(time.perf_counter() - tic)
    tic = time.perf_counter()
    generate(ckpt, balanced_labels(ev.num_samples, ckpt.model.config.num_classes), ev.sampler, ev.steps,
             ev.guidance, ev.seed, ev.batch_size, ev.clip_x0)
    result[f"evaluation_sampling_seconds_{ev.num_samples}"] = time.perf_counter() - tic
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
