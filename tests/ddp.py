"""Two real gloo ranks in two processes (no Ray), for the exact-resume test of each task and the
NaN guard's agreement test.

    records = run_then_resume_on_two_ranks(spec, tmp_path, summarize)

Each rank trains `spec` to its last step (reports into <tmp>/full), then trains it again resumed
from the full run's step-3 checkpoint (into <tmp>/resumed), every module wrapped as ditlab's Ray
Train workers wrap them (DDP, its gradients averaged through shared memory:
training/host_allreduce.py). `summarize(rank, spec, full, end_full, resumed, end_resumed)` (a
module-level function, so the spawned processes can import it) turns each rank's reporters and end
states into a JSON record; the records come back in rank order, each with "loop_collectives", the
number of `loop.all_ranks` calls the rank made over both runs.

    records = guard_on_two_ranks(tmp_path)

runs the NaN guard (training/loop.py's FiniteStepGuard) on two ranks, one of them given a NaN."""

import contextlib
import datetime
import json
import multiprocessing
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditlab.config import from_dict
from ditlab.training import LocalReporter, Placement, train
from ditlab.training.host_allreduce import share_gradients


# Rank processes fork from a forkserver that imported torch, torch._dynamo (the first optimizer step
# imports it), ditlab's training package and the digits' loader once. mp.spawn's ranks imported them
# each: the suite's 11 ranks used 65 s of CPU on 2 cores, most of it those imports, and the two-rank
# resume tests went from 7.8-8.4 s to 1.0-1.3 s. The forkserver keeps the environment it started
# with, so start_ranks hands each rank the caller's environment as it is at the call.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "ditlab.training", "sklearn.datasets"]


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """`fn(rank, *args)` in `nprocs` processes forked from the preloaded forkserver; returns when
    all have ended, raising if one failed (as mp.spawn)."""
    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the forkserver starts
    mp.start_processes(_in_environment, args=(dict(os.environ), fn, *args), nprocs=nprocs, join=True,
                       start_method="forkserver")


def _in_environment(rank: int, environ: dict, fn, *args) -> None:
    os.environ.clear()
    os.environ.update(environ)
    fn(rank, *args)


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@contextlib.contextmanager
def gloo_rank(rank: int, init_file: str):
    """This process as one of two gloo ranks, one thread, for the block's duration (a collective
    the other rank never joins fails after 5 minutes instead of hanging the suite)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(minutes=5))
    try:
        yield
    finally:
        dist.destroy_process_group()


def count_loop_collectives() -> list[bool]:
    """From now on in this (rank) process, every `loop.all_ranks` call (the loop's own collective: the
    guard's flag for parameters outside DDP) appends its flag to the returned list, then runs."""
    from ditlab.training import loop

    collectives: list[bool] = []
    all_ranks = loop.all_ranks
    loop.all_ranks = lambda flag, device: collectives.append(flag) or all_ranks(flag, device)
    return collectives


def _rank(rank: int, init_file: str, out_dir: str, spec_dict: dict, checkpoint: str, summarize) -> None:
    collectives = count_loop_collectives()
    with gloo_rank(rank, init_file):
        spec = from_dict(spec_dict)
        placement = Placement(rank=rank, world_size=2,
                              wrap_model=lambda m: share_gradients(torch.nn.parallel.DistributedDataParallel(m)))
        full = LocalReporter(f"{out_dir}/full")
        end_full = train(spec, full, placement)
        dist.barrier()
        resumed = LocalReporter(f"{out_dir}/resumed")
        end_resumed = train(spec, resumed, placement, resume_from=f"{out_dir}/full/{checkpoint}")
        record = {**summarize(rank, spec, full, end_full, resumed, end_resumed), "loop_collectives": len(collectives)}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(record, f)


def run_then_resume_on_two_ranks(spec, tmp_path, summarize, checkpoint: str = "checkpoint_000003") -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start_ranks(_rank, (str(tmp_path / "init"), str(tmp_path), spec.to_dict(), checkpoint, summarize), nprocs=2)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def _guard_rank(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1's input and its extra parameter's gradient are NaN at the first step, finite at the
    second. The DDP model's optimizer must decide alone (no collective); the optimizer over a
    parameter outside DDP must all-reduce its verdict. Records what each rank did."""
    from ditlab.training import loop

    collectives = count_loop_collectives()
    with gloo_rank(rank, init_file):
        torch.manual_seed(0)
        model, extra = torch.nn.Linear(4, 4), torch.nn.Parameter(torch.zeros(4))
        guard = loop.FiniteStepGuard(torch.device("cpu"))
        wrapped = guard.distributed(share_gradients(torch.nn.parallel.DistributedDataParallel(model)))
        inside, outside = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD([extra], lr=0.1)
        guard.cover([inside, outside])
        weights = []
        for step in range(2):
            bad = rank == 1 and step == 0
            x = torch.full((2, 4), float("nan")) if bad else torch.ones(2, 4)
            wrapped(x).sum().backward()
            extra.grad = torch.full((4,), float("nan") if bad else 1.0)
            inside.step(), outside.step()
            inside.zero_grad(), outside.zero_grad()
            weights.append([model.weight.sum().item(), extra.sum().item()])
        with open(f"{out_dir}/guard{rank}.json", "w") as f:
            json.dump({"skipped": guard.skipped, "collectives": len(collectives), "weights": weights}, f)


def guard_on_two_ranks(tmp_path) -> list[dict]:
    start_ranks(_guard_rank, (str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    return [json.loads((tmp_path / f"guard{r}.json").read_text()) for r in (0, 1)]
