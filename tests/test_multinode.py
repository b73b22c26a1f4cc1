"""Multi-node training: a head and a worker node, separate `ray start` processes on this host,
one Ray Train worker on each, ditlab's training loop under DDP over gloo between them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from ray_cluster import node_env

pytestmark = pytest.mark.e2e

STEPS = 4


@pytest.fixture(scope="module")
def two_nodes(ray_head):
    """The shared head plus a worker node with one CPU, stopped again after this module."""
    worker = ray_head.add_worker_node(ray_head.temp_dir.parent / "worker", num_cpus=1)
    yield ray_head
    ray_head.workers.remove(worker)
    left = worker.stop()
    assert not left, f"worker node processes still running: {left}"


@pytest.fixture(scope="module")
def ranks(two_nodes, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    env = {**node_env(two_nodes.token), "RAY_TRAIN_V2_ENABLED": "1"}
    command = [sys.executable, str(ROOT / "tests" / "multinode_driver.py"), "--address", two_nodes.gcs_address,
               "--spec", str(ROOT / "experiments" / "tiny.yaml"), "--steps", str(STEPS),
               "--storage", str(out / "runs"), "--out", str(out / "ranks.json")]
    try:
        proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:  # its partial output comes as bytes
        stderr = (err.stderr or b"").decode(errors="replace")
        pytest.fail(f"the driver ran 600 s; head {two_nodes.describe()}\ndriver stderr:\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"head {two_nodes.describe()}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    return json.loads((out / "ranks.json").read_text())


def test_one_rank_on_each_node(ranks):
    assert len(ranks["nodes"]) == 2
    assert [r["rank"] for r in ranks["ranks"]] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks["ranks"])
    assert {r["node_id"] for r in ranks["ranks"]} == set(ranks["nodes"])


def test_ranks_hold_identical_weights_after_ddp_steps(ranks):
    rank0, rank1 = ranks["ranks"]
    assert rank0["step"] == rank1["step"] == STEPS
    # Seeded per rank, the two models start apart; only DDP (rank 0's broadcast, then averaged
    # gradients on batches that differ per rank) can make them agree after training.
    assert rank0["initial_digest"] != rank1["initial_digest"]
    assert rank0["final_digest"] == rank1["final_digest"]
    assert rank0["final_digest"] != rank0["initial_digest"], "the steps did not change the weights"
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) >= 1  # all-reduced metrics


def test_losing_the_worker_node_fails_the_run_naming_it(two_nodes, ranks, tmp_path):
    """`ditlab train` with three workers (two on the head, one on the worker node); once its step-2
    checkpoint is written the worker node's raylet is killed. The run stops within a bounded time
    with one error line naming the lost node (resources.max_failures is 0: no retry), and its
    checkpoints stay for a rerun."""
    import signal
    import time

    worker = two_nodes.workers[0]
    env = {**node_env(two_nodes.token), "RAY_TRAIN_V2_ENABLED": "1", "RAY_ADDRESS": two_nodes.gcs_address,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "DITLAB_FAULT_STEP_SECONDS": "0.5"}
    run_dir = tmp_path / "runs" / "lost"
    command = [str(Path(sys.executable).parent / "ditlab"), "train", str(ROOT / "experiments" / "tiny.yaml"),
               "--storage", str(tmp_path / "runs"), "--name", "lost", "--no-progress",
               *(x for kv in ("resources.num_workers=3", "train.batch_size=15", "train.steps=60",
                              "train.log_every=1", "train.checkpoint_every=2") for x in ("--set", kv))]
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoint_000002").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, f"no checkpoint 2: {proc.communicate()[1]}"
            time.sleep(0.1)
        raylets = [p for p in worker.processes() if p.name() == "raylet"]
        assert len(raylets) == 1, f"worker node {worker.describe()}"
        raylets[0].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=240)  # the bound: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # The surviving workers' own errors (a closed gloo connection) reach stderr too, as Ray's log lines.
    errors = [line for line in err.splitlines() if line.startswith("ditlab: error:")]
    assert proc.returncode == 1 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith("ditlab: error: Ray node ") and "was lost during training" in errors[0], errors
    assert any(node in errors[0] for node in ranks["nodes"]), errors
    assert (run_dir / "checkpoint_000002" / "checkpoint.pt").is_file()
