"""Driver of the multi-node test: joins a running Ray cluster, trains with ditlab's training loop
under DDP with one Ray Train worker per node, and writes what each rank ended with as JSON.

    python tests/multinode_driver.py --address HOST:PORT --spec experiments/tiny.yaml --steps 4 --out ranks.json

A separate process because a test session may already hold a local Ray instance, and one
process joins one Ray cluster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from ditlab.config import from_dict, load
from ditlab.training.loop import Placement, train
from ditlab.training.reporter import LocalReporter


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rank_worker(config: dict) -> None:
    """One Ray Train worker: the ditlab loop, then this rank's node and weights into the queue."""
    torch.set_num_threads(1)
    spec = from_dict(config["spec"], "spec sent to worker")
    ctx = ray.train.get_context()
    before_ddp = {}

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        # Each rank initialises with its own seed; DDP then broadcasts rank 0's weights.
        before_ddp["digest"] = parameter_digest(model)
        return ray.train.torch.prepare_model(model)

    placement = Placement(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                          device=ray.train.torch.get_device(), wrap_model=wrap)
    reporter = LocalReporter()
    state = train(spec, reporter, placement)
    config["results"].put({
        "rank": placement.rank,
        "world_size": placement.world_size,
        "node_id": ray.get_runtime_context().get_node_id(),
        "initial_digest": before_ddp["digest"],
        "final_digest": parameter_digest(state.model),
        "step": state.step,
        "losses": [h["loss"] for h in reporter.history if "loss" in h],
    })
    ray.train.report({"step": state.step})


def wait_for_nodes(count: int, timeout: float) -> list[str]:
    """The ids of the cluster's alive nodes once there are `count` (a joining node takes a while)."""
    deadline = time.monotonic() + timeout
    while len(alive := sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(alive)} of {count} nodes joined in {timeout} s")
        time.sleep(1)
    return alive


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True, help="the cluster's GCS address, HOST:PORT")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--storage", required=True, help="Ray Train's storage path")
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    args = parser.parse_args()

    ray.init(address=args.address, logging_level="warning")
    nodes = wait_for_nodes(2, timeout=180)
    spec = load(args.spec, [f"train.steps={args.steps}", f"train.log_every={args.steps}"])
    results = Queue()
    trainer = TorchTrainer(
        rank_worker,
        train_loop_config={"spec": spec.to_dict(), "results": results},
        # STRICT_SPREAD: each worker on a node of its own, whatever CPUs the head has spare.
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(name="multinode", storage_path=args.storage),
    )
    trainer.fit()
    ranks = sorted((results.get(timeout=60) for _ in range(2)), key=lambda r: r["rank"])
    Path(args.out).write_text(json.dumps({"nodes": nodes, "ranks": ranks}, indent=2))


if __name__ == "__main__":
    main()
