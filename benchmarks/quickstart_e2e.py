"""Benchmark: the quickstart end to end, as a user runs it, for several revisions or settings side by side.

    python benchmarks/quickstart_e2e.py --variant "NAME=REV[: --set KEY=VALUE ...]" ... [--rounds 2]
        [--spec experiments/quickstart.yaml] [--json FILE]

e.g. the quickstart when issue 14 was filed against today's, and today's without its in-training FID:

    python benchmarks/quickstart_e2e.py --variant filed=b2008ff --variant head=HEAD \\
        --variant "no curve=HEAD: --set train.eval_every=null" --rounds 2

or the training stage alone (`ditlab train`, no evaluation), for its images/s per worker, the filed
revision against today's code at the filed model size:

    python benchmarks/quickstart_e2e.py --command train --rounds 3 \\
        --variant "filed=b2008ff: --set train.steps=200 --set train.checkpoint_every=200" \\
        --variant "head=HEAD: --set model.depth=6 --set train.steps=200 --set train.checkpoint_every=200"

or a run's fixed costs alone (imports, Ray, MLflow, starting and stopping the workers, the checkpoint),
with no steps and no evaluation, before and after a change:

    python benchmarks/quickstart_e2e.py --rounds 3 \\
        --variant "before=a5b5556: --set train.steps=0 --set evaluation.num_samples=0" \\
        --variant "after=HEAD: --set train.steps=0 --set evaluation.num_samples=0"

Each run is what the README's quickstart does on a fresh clone with a cold cache: a `git clone` of
this repository at REV into a temporary folder, an empty DITLAB_CACHE_DIR (no cached Inception
reference features), then `python -m ditlab.cli run SPEC --json --no-progress` (`train` with
`--command train`; what the clone's `ditlab` executable runs, its exit included) with that clone's
package (PYTHONPATH) and this environment's packages. Rounds alternate the variants, in reverse
order every other round (A B C, C B A, A B C), so a machine that slows down or speeds up mid-run
shifts every variant alike, and no variant always runs right after the same other one. Printed per
variant: the median wall seconds (process start to exit), the run's own train_seconds, the median of
the rest (wall less training: imports, Ray, MLflow, the evaluation, the exit), its final FID and
conditional accuracy (deterministic for a revision, its settings and the CPU), the training loop's steady
images/s per worker (the median of its log windows after the first, from the run's history.json),
and the ratios of wall time and of images/s per worker to the first variant. Run it with nothing
else on the machine: it measures the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import header, steady_images_per_sec, table

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """"NAME=REV: extra args" -> (name, rev, args)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {text!r}: expected NAME=REV[: ARGS]")
    rev, _, args = rest.partition(":")
    return name.strip(), rev.strip(), shlex.split(args)


def per_worker_images_per_sec(run_dir: Path) -> float | None:
    """The run's steady images/s (common.steady_images_per_sec, from its history.json) divided by
    its spec's workers; None for a run with fewer than two log windows."""
    steady = steady_images_per_sec(json.loads((run_dir / "history.json").read_text())["history"])
    if steady is None:
        return None
    return steady / yaml.safe_load((run_dir / "spec.yaml").read_text())["resources"]["num_workers"]


def run_once(rev: str, args: list[str], spec: str, command_name: str = "run") -> dict:
    with tempfile.TemporaryDirectory(prefix="ditlab-qs-e2e-") as tmp:
        clone = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", rev], check=True)
        commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        env = {**os.environ, "PYTHONPATH": str(clone / "src"), "DITLAB_CACHE_DIR": str(Path(tmp) / "cache")}
        # The clone's `python -m ditlab.cli`: what its `ditlab` executable runs, exit included.
        command = [sys.executable, "-m", "ditlab.cli",
                   command_name, spec, "--name", "quickstart", "--json", "--no-progress", *args]
        tic = time.perf_counter()
        done = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - tic
        if done.returncode != 0:
            raise SystemExit(f"{rev} {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}")
        summary = json.loads(done.stdout)
        metrics = summary["metrics"]
        img_s = per_worker_images_per_sec(clone / summary["run_dir"])
    return {"commit": commit, "wall_s": wall, "train_s": metrics.get("train_seconds"), "img_s_per_worker": img_s,
            "fid": metrics.get("fid"), "conditional_accuracy": metrics.get("conditional_accuracy")}


def figure(value: float | None, digits: int) -> str:
    """A run's figure, or "-" where it has none (a run with evaluation.num_samples=0 has no FID)."""
    return "-" if value is None else f"{value:.{digits}f}"


def median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help='"NAME=REV[: ARGS]"')
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spec", default="experiments/quickstart.yaml")
    parser.add_argument("--command", choices=("run", "train"), default="run",
                        help="train: the training stage alone (`ditlab train`), no evaluation")
    parser.add_argument("--json", type=Path, help="also write the runs and the summary here")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    stage = "end to end" if args.command == "run" else "training stage (ditlab train)"
    print(header(f"The quickstart {stage}: fresh clone, cold cache, variants alternated"), flush=True)
    runs: list[dict] = []
    for r in range(args.rounds):
        # A B A B would always run B right after A; A B B A puts each variant first and last alike.
        for name, rev, extra in (variants if r % 2 == 0 else variants[::-1]):
            run = {"variant": name, "round": r + 1, **run_once(rev, extra, args.spec, args.command)}
            runs.append(run)
            print(f"# round {r + 1} {name} ({run['commit']}): {run['wall_s']:.1f} s, "
                  f"train {figure(run['train_s'], 1)} s, {figure(run['img_s_per_worker'], 1)} images/s per worker, "
                  f"FID {figure(run['fid'], 4)}, "
                  f"accuracy {figure(run['conditional_accuracy'], 4)}", flush=True)
    rows = []
    for name, _, extra in variants:
        mine = [x for x in runs if x["variant"] == name]
        rows.append({"variant": name, "rev": f"{mine[0]['commit']} {' '.join(extra)}".strip(),
                     "wall s (each)": " / ".join(f"{x['wall_s']:.0f}" for x in mine),
                     "wall s median": statistics.median(x["wall_s"] for x in mine),
                     "train s median": statistics.median(x["train_s"] for x in mine),
                     # Everything but the training stage: imports, Ray, MLflow, evaluation, exit.
                     "rest s median": statistics.median(x["wall_s"] - x["train_s"] for x in mine),
                     "img/s per worker (each)": " / ".join(figure(x["img_s_per_worker"], 0) for x in mine),
                     "img/s per worker median": median_or_none([x["img_s_per_worker"] for x in mine]),
                     "FID": figure(mine[0]["fid"], 4), "accuracy": figure(mine[0]["conditional_accuracy"], 4)})
    for row in rows:
        row["speed-up vs first"] = rows[0]["wall s median"] / row["wall s median"]
        first, mine = rows[0]["img/s per worker median"], row["img/s per worker median"]
        row["img/s per worker vs first"] = mine / first if first and mine else None
    print(table(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "runs": runs, "summary": rows}, indent=1))


if __name__ == "__main__":
    main()
