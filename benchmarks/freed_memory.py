"""Benchmark: a `ditlab` command with the process keeping the memory it frees, and without.

    python benchmarks/freed_memory.py --checkpoint runs/quickstart/checkpoint_000500 [--rounds 3]
        [--json FILE] [-- ditlab arguments ...]

By default it runs `ditlab evaluate --fake CHECKPOINT --protocol evaluation/digits.yaml` (sampling
300 images, their Inception features, the metrics); arguments after `--` replace it, with
CHECKPOINT and OUT in them standing for the checkpoint and a fresh output folder. Each run is a
fresh `python -m ditlab.cli ... --json --no-progress` process in a temporary folder (its own
MLflow store), once as shipped ("kept": ditlab/allocator.py sets glibc's malloc to keep freed
memory) and once with DITLAB_KEEP_FREED_MEMORY=0 ("system": glibc's defaults), alternating, in
reverse order every other round. The reference features' cache is left as it is: warm it first
with one run. Printed per setting: the median wall seconds, the command's own sampling and feature
seconds (from its JSON, where it has them), the minor page faults and the peak resident memory
(the kernel's accounting of the finished process, `wait4`), and the ratios of system to kept.
Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import header, table

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"kept": "1", "system": "0"}


def run_once(argv: list[str], keep: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="ditlab-freed-") as tmp:
        args = [a.replace("OUT", str(Path(tmp) / "out")) for a in argv]
        env = {**os.environ, "DITLAB_KEEP_FREED_MEMORY": keep, "PYTHONPATH": str(ROOT / "src"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        with open(Path(tmp) / "stdout", "w+") as out, open(Path(tmp) / "stderr", "w+") as err:
            tic = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "ditlab.cli", *args, "--json", "--no-progress"], cwd=tmp,
                                    env=env, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)  # the finished process's own rusage
            wall = time.perf_counter() - tic
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0), err.seek(0)
            out, err = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"ditlab {' '.join(args)} failed:\n{err[-2000:]}")
    figures = json.loads(out).get("figures", {})
    return {"wall_s": wall, "sampling_s": figures.get("eval_sampling_seconds"),
            "features_s": figures.get("eval_feature_seconds"), "minor_faults": usage.ru_minflt,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder (CHECKPOINT in the command)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write every run here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the ditlab arguments")
    args = parser.parse_args()
    command = [a for a in args.command if a != "--"] or [
        "evaluate", "--fake", "CHECKPOINT", "--protocol", str(ROOT / "evaluation" / "digits.yaml"), "--out", "OUT"]
    command = [a.replace("CHECKPOINT", str(Path(args.checkpoint).resolve())) for a in command]
    runs = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
            runs[name].append(run_once(command, SETTINGS[name]))
            print(f"round {r + 1} {name}: {runs[name][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for name, done in runs.items():
        row = {"setting": name}
        for key in done[0]:
            values = [d[key] for d in done if d[key] is not None]
            row[key] = statistics.median(values) if values else None
        row["wall_each"] = " / ".join(f"{d['wall_s']:.1f}" for d in done)
        rows.append(row)
    kept, system = rows
    system["system_over_kept_wall"] = system["wall_s"] / kept["wall_s"]
    pairs = [s["wall_s"] / k["wall_s"] for k, s in zip(runs["kept"], runs["system"], strict=True)]
    print(header(f"ditlab {' '.join(command)}: freed memory kept (as shipped) against glibc's defaults"))
    print(table(rows, ["setting", "wall_s", "wall_each", "sampling_s", "features_s", "minor_faults",
                       "peak_rss_mb", "system_over_kept_wall"]))
    print("system / kept wall time, round by round: " + " / ".join(f"{p:.3f}" for p in pairs))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "runs": runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
