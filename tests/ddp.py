"""Two real gloo ranks in two processes (no Ray), for the exact-resume test of each task.

    records = run_then_resume_on_two_ranks(spec, tmp_path, summarize)

Each rank trains `spec` to its last step (reports into <tmp>/full), then trains it again resumed
from the full run's step-3 checkpoint (into <tmp>/resumed), every module DDP-wrapped as Ray Train
wraps them. `summarize(rank, spec, full, end_full, resumed, end_resumed)` (a module-level function,
so the spawned processes can import it) turns each rank's reporters and end states into a JSON
record; the records come back in rank order."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditlab.config import from_dict
from ditlab.training import LocalReporter, Placement, train


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _rank(rank: int, init_file: str, out_dir: str, spec_dict: dict, checkpoint: str, summarize) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        spec = from_dict(spec_dict)
        placement = Placement(rank=rank, world_size=2,
                              wrap_model=lambda m: torch.nn.parallel.DistributedDataParallel(m))
        full = LocalReporter(f"{out_dir}/full")
        end_full = train(spec, full, placement)
        dist.barrier()
        resumed = LocalReporter(f"{out_dir}/resumed")
        end_resumed = train(spec, resumed, placement, resume_from=f"{out_dir}/full/{checkpoint}")
        record = summarize(rank, spec, full, end_full, resumed, end_resumed)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def run_then_resume_on_two_ranks(spec, tmp_path, summarize, checkpoint: str = "checkpoint_000003") -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path), spec.to_dict(), checkpoint, summarize),
             nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
