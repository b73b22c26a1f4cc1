"""Multi-node training: a head and a worker node, separate `ray start` processes on this host,
one Ray Train worker on each, ditlab's training loop under DDP over gloo between them."""

import json
import subprocess
import sys

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
