"""DDP's gradient average through shared memory (training/host_allreduce.py) against gloo's, on real
gloo ranks in three processes (no Ray): bit for bit on two ranks, to float rounding on three, over
several steps and the buckets DDP rebuilds after the first; gloo kept where it is turned off; a
rank that ends fails the others' wait; no file left in /dev/shm."""

import datetime
import glob
import json
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp import start_ranks
from ditlab.training.host_allreduce import ENV, SHM_DIR, share_gradients

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="no /dev/shm")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 3))


def _train(wrapped: torch.nn.Module, rank: int, steps: int = 4) -> list[torch.Tensor]:
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    for _ in range(steps):
        opt.zero_grad()
        wrapped(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in wrapped.parameters()]


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(minutes=5))
    pair = dist.new_group([0, 1])
    record = {}
    # buckets of about 4 KB: several a step, and DDP rebuilds them after the first step
    # "mixed": slots sized as if DDP's cap were 0, so a bucket holding more than the largest
    # parameter (4096 elements) goes through gloo, the others through shared memory
    for name, group, cap in (("three", None, None), ("two", pair, None), ("mixed", None, 0)):
        if group is not None and rank == 2:
            continue
        plain = _train(DDP(_model(), process_group=group, bucket_cap_mb=0.004), rank)
        shared = DDP(_model(), process_group=group, bucket_cap_mb=0.004)
        if cap is not None:
            shared.bucket_bytes_cap = cap
        shared = share_gradients(shared)
        record[f"{name}_hooked"] = hasattr(shared, "host_average")
        ours = _train(shared, rank)
        if hasattr(shared, "host_average"):
            record[f"{name}_paths"] = [shared.host_average.calls, shared.host_average.through_gloo]
        record[f"{name}_equal"] = all(torch.equal(a, b) for a, b in zip(plain, ours, strict=True))
        record[f"{name}_max_diff"] = max((a - b).abs().max().item() for a, b in zip(plain, ours, strict=True))
        record[f"{name}_moved"] = max((a - b).abs().max().item()
                                      for a, b in zip(ours, _model().parameters(), strict=True))
    dist.barrier()
    os.environ[ENV] = "0"
    record["off_hooked"] = hasattr(share_gradients(DDP(_model())), "host_average")
    os.environ[ENV] = "1"
    # rank 2 ends before its first backward: the others' wait fails, naming it, as gloo would fail
    orphaned = share_gradients(DDP(_model()))
    if rank != 2:
        try:
            _train(orphaned, rank, steps=1)
        except RuntimeError as err:
            record["orphaned_error"] = str(err)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(record, f)
    os._exit(0)  # no teardown of a process group that lost a rank


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("host_allreduce")
    before = set(glob.glob(f"{SHM_DIR}/ditlab-allreduce-*"))
    start_ranks(_rank, (str(tmp / "init"), str(tmp)), nprocs=3)
    assert set(glob.glob(f"{SHM_DIR}/ditlab-allreduce-*")) == before, "a segment was left in /dev/shm"
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(3)]


def test_two_ranks_average_bit_for_bit_as_gloo(records):
    for record in records[:2]:
        assert record["two_hooked"]
        assert record["two_moved"] > 1e-3  # the steps did change the weights
        assert record["two_equal"], record["two_max_diff"]


def test_three_ranks_average_as_gloo_to_float_rounding(records):
    for record in records:
        assert record["three_hooked"] and record["three_moved"] > 1e-3
        assert record["three_max_diff"] < 1e-6


def test_a_bucket_larger_than_a_slot_goes_through_gloo(records):
    for record in records:
        assert record["mixed_hooked"]
        shared_memory, gloo = record["mixed_paths"]
        assert shared_memory > 0 and gloo > 0, record["mixed_paths"]
        assert record["mixed_max_diff"] < 1e-6


def test_a_rank_whose_process_ended_fails_the_others_wait_as_a_lost_peer(records):
    from ditlab.orchestration.train import lost_peer_error

    for record in records[:2]:
        error = record.get("orphaned_error", "")
        assert "rank 2's process" in error and "ended" in error, error
        assert lost_peer_error(error)


def test_turned_off_keeps_gloo(records):
    assert not any(record["off_hooked"] for record in records)
