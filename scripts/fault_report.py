"""Inject each fault ditlab is meant to survive, one after the other, and print what it cost.

    flock /tmp/ditlab-ray.lock .venv/bin/python scripts/fault_report.py [--out fault_report.json]

Everything runs here, for real, on a throwaway cluster this script starts and stops: a Ray head
(2 CPUs) plus a worker node (1 CPU), each a `ray start` process of its own (tests/ray_cluster.py),
and an `mlflow server` on 127.0.0.1 (tests/conftest.py's). Each fault is one tiny `ditlab train`
(experiments/tiny.yaml, 8x8 digits, DiT-N/2) run as a user runs it, a separate process joining the
cluster, with the fault-injection hooks of src/ditlab/training/faults.py:

    worker crash      rank 1 exits (os._exit) after step 5; resources.max_failures=1
    driver crash      the `ditlab train` process is SIGKILLed after its step-4 checkpoint; the same
                      command is run again
    node loss         three workers, one on the worker node, whose raylet is SIGKILLed after step 4;
                      the run fails naming the node; a new node joins and the command is run again
    corrupt ckpt      the driver is killed after step 4 and a byte of checkpoint_000004 flipped; the
                      rerun is refused naming it, then run with --skip-corrupt-checkpoints
    NaN step          step 3's batch is NaN on rank 1
    NaN streak        steps 3.. are NaN with train.max_bad_steps=3: the run must stop with the
                      TrainingDiverged error, keeping checkpoint_000002 (that is what surviving means here)
    tracking at start the tracking URI names a port nobody listens on: one error line, nothing written
    tracking mid-run  the MLflow server is stopped after step 2 is logged and started again at once

For each: survived (the run ended as it should: FINISHED at its last step, or the clear stop the
fault calls for), steps lost (steps short of the last one), steps redone (trained twice: between
the checkpoint resumed from and the fault), metrics lost and duplicated (train/loss in the MLflow
run against the steps that ran, skipped steps excepted) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, mlflow_web  # noqa: E402  (the test helpers: one way to start these)
from ray_cluster import RayHead, node_env  # noqa: E402

DITLAB = Path(sys.executable).parent / "ditlab"
TINY = ROOT / "experiments" / "tiny.yaml"
STEPS = 8


@dataclass
class Row:
    fault: str
    survived: bool
    steps_lost: int
    steps_redone: int
    metrics_lost: int
    metrics_duplicated: int
    wall_seconds: float
    note: str = ""


class Lab:
    """The cluster, the tracking server and a folder of runs, shared by every fault."""

    def __init__(self, root: Path, head: RayHead, tracking_uri: str):
        self.root, self.head, self.uri = root, head, tracking_uri

    def env(self, **extra: str) -> dict[str, str]:
        return {**node_env(self.head.token), "RAY_TRAIN_V2_ENABLED": "1", "RAY_ADDRESS": self.head.gcs_address,
                "MLFLOW_TRACKING_URI": self.uri, **extra}

    def args(self, name: str, *sets: str) -> list[str]:
        overrides = [f"train.steps={STEPS}", "train.log_every=1", "train.checkpoint_every=2", *sets]
        return [str(DITLAB), "train", str(TINY), "--storage", str(self.root / "runs"), "--name", name,
                "--no-progress", "--json", *(x for kv in overrides for x in ("--set", kv))]

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout)

    def start(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def wait_for(self, path: Path, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"{path} never appeared")
            time.sleep(0.05)

    def loss_steps(self, name: str) -> list[int]:
        from mlflow.tracking import MlflowClient

        run_id = json.loads((self.run_dir(name) / "tracking.json").read_text())["run_id"]
        return [m.step for m in MlflowClient(tracking_uri=self.uri).get_metric_history(run_id, "train/loss")]

    def mlflow_run(self, name: str):
        from mlflow.tracking import MlflowClient

        run_id = json.loads((self.run_dir(name) / "tracking.json").read_text())["run_id"]
        return MlflowClient(tracking_uri=self.uri).get_run(run_id)

    def status(self, name: str) -> str:
        return self.mlflow_run(name).info.status

    def last_checkpoint(self, name: str) -> int:
        from ditlab.training.checkpoint import checkpoint_dirs

        found = checkpoint_dirs(self.run_dir(name))
        return int(found[-1].name.split("_")[1]) if found else 0

    def row(self, fault: str, name: str, started: float, ok: bool, redone: int, skipped: frozenset = frozenset(),
            last: int = STEPS, note: str = "") -> Row:
        """The row of a run that should have reached step `last` with every non-skipped step logged once."""
        logged = Counter(self.loss_steps(name))
        expected = [s for s in range(1, last + 1) if s not in skipped]
        lost = sum(1 for s in expected if s not in logged)
        duplicated = sum(n - 1 for n in logged.values()) + sum(1 for s in logged if s not in expected)
        reached = self.last_checkpoint(name)
        return Row(fault, ok and not lost and not duplicated, max(last - reached, 0), redone, lost, duplicated,
                   round(time.monotonic() - started, 1), note)


def kill_after(lab: Lab, name: str, step: int, argv: list[str], env: dict[str, str]) -> None:
    """Start `argv`; SIGKILL it once its checkpoint of `step` is written."""
    proc = lab.start(argv, env)
    try:
        lab.wait_for(lab.run_dir(name) / f"checkpoint_{step:06d}" / "checkpoint.pt.sha256", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()


def worker_crash(lab: Lab) -> Row:
    started, name = time.monotonic(), "worker-crash"
    env = lab.env(DITLAB_FAULT_EXIT_AT_STEP="5", DITLAB_FAULT_RANK="1",
                  DITLAB_FAULT_MARKER=str(lab.root / "worker-crash.marker"))
    done = lab.run(lab.args(name, "resources.max_failures=1"), env)
    crashed = (lab.root / "worker-crash.marker").exists()
    return lab.row("worker crash", name, started, done.returncode == 0 and crashed and lab.status(name) == "FINISHED",
                   redone=5 - 4, note="" if crashed else "did not crash")


def driver_crash(lab: Lab) -> Row:
    started, name = time.monotonic(), "driver-crash"
    argv = lab.args(name)
    kill_after(lab, name, 4, argv, lab.env(DITLAB_FAULT_STEP_SECONDS="0.5"))
    killed_at = max(lab.loss_steps(name), default=0)
    done = lab.run(argv, lab.env())
    return lab.row("driver crash (SIGKILL)", name, started, done.returncode == 0 and lab.status(name) == "FINISHED",
                   redone=max(killed_at - 4, 0), note=f"killed after step {killed_at} was logged")


def node_loss(lab: Lab) -> Row:
    started, name = time.monotonic(), "node-loss"
    argv = lab.args(name, "resources.num_workers=3", "train.batch_size=15")
    proc = lab.start(argv, lab.env(DITLAB_FAULT_STEP_SECONDS="0.5"))
    lab.wait_for(lab.run_dir(name) / "checkpoint_000004", proc)
    worker = lab.head.workers[-1]
    for p in worker.processes():
        if p.name() == "raylet":
            p.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    named = [line for line in err.splitlines() if line.startswith("ditlab: error: Ray node")]
    failed_at = max(lab.loss_steps(name), default=0)
    lab.head.workers.remove(worker)
    worker.stop()
    replacement = lab.head.add_worker_node(lab.root / f"node-{len(lab.head.workers)}", num_cpus=1)
    wait_for_nodes(lab, 2)
    done = lab.run(argv, lab.env())
    ok = proc.returncode == 1 and bool(named) and done.returncode == 0 and lab.status(name) == "FINISHED"
    assert replacement in lab.head.workers
    return lab.row("node loss (raylet killed)", name, started, ok, redone=max(failed_at - 4, 0),
                   note="failed naming the node; rerun on a new node" if named else "no error naming the node")


def wait_for_nodes(lab: Lab, count: int, timeout: float = 120) -> None:
    probe = ("import ray, time, sys; ray.init(logging_level='error'); t=time.time()\n"
             f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
             f"    time.sleep(1); assert time.time() - t < {timeout}\n")
    subprocess.run([sys.executable, "-c", probe], env=lab.env(), check=True, timeout=timeout + 60,
                   capture_output=True)


def corrupt_checkpoint(lab: Lab) -> Row:
    started, name = time.monotonic(), "corrupt"
    argv = lab.args(name)
    kill_after(lab, name, 4, argv, lab.env(DITLAB_FAULT_STEP_SECONDS="0.5"))
    killed_at = max(lab.loss_steps(name), default=0)
    bundle = lab.run_dir(name) / "checkpoint_000004" / "checkpoint.pt"
    raw = bytearray(bundle.read_bytes())
    raw[-20] ^= 0xFF
    bundle.write_bytes(bytes(raw))
    refused = lab.run(argv, lab.env())
    named = refused.returncode == 2 and "checkpoint_000004" in refused.stderr
    done = lab.run([*argv, "--skip-corrupt-checkpoints"], lab.env())
    ok = named and done.returncode == 0 and lab.status(name) == "FINISHED"
    return lab.row("corrupt latest checkpoint", name, started, ok, redone=max(killed_at - 2, 0),
                   note="refused by name, then resumed from checkpoint_000002 with the flag")


def nan_step(lab: Lab) -> Row:
    started, name = time.monotonic(), "nan-step"
    done = lab.run(lab.args(name), lab.env(DITLAB_FAULT_NAN_AT_STEPS="3", DITLAB_FAULT_RANK="1"))
    ok = done.returncode == 0 and lab.status(name) == "FINISHED"
    return lab.row("NaN batch (rank 1, step 3)", name, started, ok, redone=0, skipped=frozenset({3}),
                   note="step skipped on both ranks, train/skipped_steps=1")


def nan_streak(lab: Lab) -> Row:
    started, name = time.monotonic(), "nan-streak"
    done = lab.run(lab.args(name, "train.max_bad_steps=3"), lab.env(DITLAB_FAULT_NAN_AT_STEPS="3-8"))
    logged = "train.max_bad_steps=3" in lab.mlflow_run(name).data.tags.get("ditlab.error", "")
    stopped = done.returncode != 0 and "train.max_bad_steps=3" in done.stderr and lab.status(name) == "FAILED"
    stopped = stopped and logged
    # Checkpoints during the streak hold the weights of step 2: no bad step reached them.
    row = lab.row("NaN streak (max_bad_steps=3)", name, started, stopped, redone=0, last=2,
                  note=f"stopped with TrainingDiverged at step 5, run FAILED with tag ditlab.error; last checkpoint "
                       f"{lab.last_checkpoint(name)} holds step 2's weights")
    row.steps_lost = 0  # stopping is the expected outcome, not a loss
    return row


def tracking_at_start(lab: Lab) -> Row:
    started, name = time.monotonic(), "tracking-start"
    done = lab.run(lab.args(name), lab.env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}"))
    lines = done.stderr.strip().splitlines()
    ok = done.returncode == 2 and len(lines) == 1 and "does not answer" in lines[0] and not lab.run_dir(name).exists()
    return Row("tracking server down at start", ok, 0, 0, 0, 0, round(time.monotonic() - started, 1),
               "one error line before Ray starts, nothing written")


def tracking_mid_run(lab: Lab, server_root: Path, port: int) -> Row:
    """Needs a server of its own: stopped and started again on the same port and store."""
    started, name = time.monotonic(), "tracking-mid-run"
    with mlflow_web("server", server_root, "--workers", "1", port=port) as uri:
        lab_here = Lab(lab.root, lab.head, uri)
        proc = lab_here.start(lab_here.args(name), lab_here.env(DITLAB_FAULT_STEP_SECONDS="0.5",
                                                                MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"))
        lab_here.wait_for(lab_here.run_dir(name) / "tracking.json", proc)
        deadline = time.monotonic() + 300
        while 2 not in lab_here.loss_steps(name) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    with mlflow_web("server", server_root, "--workers", "1", port=port):
        _, err = proc.communicate(timeout=600)
        buffered = "MLflow did not take step" in err
        ok = proc.returncode == 0 and lab_here.status(name) == "FINISHED"
        return lab_here.row("tracking server stopped mid-run", name, started, ok, redone=0,
                            note="reports buffered and sent on return" if buffered else "no report was refused")


def print_table(rows: list[Row]) -> None:
    header = ("fault", "survived", "steps lost", "steps redone", "metrics lost", "metrics dup", "wall s", "note")
    cells = [header] + [(r.fault, "yes" if r.survived else "NO", str(r.steps_lost), str(r.steps_redone),
                         str(r.metrics_lost), str(r.metrics_duplicated), f"{r.wall_seconds:.1f}", r.note) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ditlab-faults-"))
    head = RayHead(root / "head", token=secrets.token_hex(32))
    rows: list[Row] = []
    try:
        head.wait_until_serving()
        head.add_worker_node(root / "node-0", num_cpus=1)
        (root / "mlflow").mkdir()
        (root / "mlflow-own").mkdir()
        with mlflow_web("server", root / "mlflow", "--workers", "1") as uri:
            lab = Lab(root, head, uri)
            wait_for_nodes(lab, 2)
            faults: list[Callable[[], Row]] = [
                lambda: worker_crash(lab), lambda: driver_crash(lab), lambda: node_loss(lab),
                lambda: corrupt_checkpoint(lab), lambda: nan_step(lab), lambda: nan_streak(lab),
                lambda: tracking_at_start(lab), lambda: tracking_mid_run(lab, root / "mlflow-own", free_port())]
            for fault in faults:
                rows.append(fault())
                print(f"{rows[-1].fault}: {'survived' if rows[-1].survived else 'NOT survived'} "
                      f"({rows[-1].wall_seconds:.0f} s)", file=sys.stderr, flush=True)
    finally:
        left = [pid for node in [*head.workers, head] for pid in node.stop()]
        shutil.rmtree(root, ignore_errors=True)
        if left:
            print(f"Ray processes left running: {left}", file=sys.stderr)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    sys.exit(0 if rows and all(r.survived for r in rows) else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
