"""DDP's gradient average through shared memory, for ranks that share one host's CPUs.

On CPUs DDP averages each bucket of gradients with gloo over TCP, through the kernel's loopback. On
the 2-core development machine that cost the shipped quickstart's two ranks 11-17% of their
images/s, though gloo moves the model's 5.2 MB of gradients in 4.4 ms alone (BENCHMARKS.md,
"Gradients through shared memory"). Ranks on one host can instead each write their bucket into a
shared memory segment, wait until every other rank has written its own, and sum the slots in rank
order. That is a DDP communication hook, registered here: 1.056x the images/s per worker of the
quickstart at the filed model size, in Ray Train's 2-worker run.

The average is the one DDP computes: each rank's gradients divided by the world size, then summed.
With two ranks that is bit for bit gloo's result (tests/test_host_allreduce.py); with more, the sum
runs in rank order where gloo's ring adds in another, so results agree to float rounding.

Used only where every rank agrees it can be (`share_gradients`): a gloo process group, fp32 CPU
parameters, an x86-64 CPU (whose stores other cores see in program order: the data before the flag
that announces it), the segment within `MAX_SEGMENT_BYTES` and the room /dev/shm has, and every
rank able to open the segment rank 0 made (so ranks in different containers of one host fall back).
Anything else, or `DITLAB_SHARED_MEMORY_ALLREDUCE=0`, keeps gloo. The segment's file is unlinked
once every rank has mapped it: nothing is left in /dev/shm when the processes end."""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

ENV = "DITLAB_SHARED_MEMORY_ALLREDUCE"
SHM_DIR = "/dev/shm"
# Two slots (alternating calls) per rank, each the size of DDP's largest bucket: its byte cap (25 MB
# by default) plus one parameter, or the whole model where that is smaller. DiT-XL/2 on 8 ranks needs
# about 0.8 GB; a segment past this cap keeps gloo.
MAX_SEGMENT_BYTES = 1 << 30
# How long a rank waits for the others' gradients before failing (gloo's default timeout). A rank
# that dies stops its Ray Train worker group well before that.
WAIT_TIMEOUT_S = 1800.0
HEADER = 64        # a random token: proves a rank opened the segment rank 0 made
FLAG_STRIDE = 64   # one cache line per rank for its call counter
PAGE = 4096


def share_gradients(model: nn.Module) -> nn.Module:
    """Registers the shared-memory average on `model` if it is a DDP module whose ranks all can use
    it (module docstring); returns `model`. A collective: every rank must call it, in the same order
    for the same modules, right after wrapping."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    group = model.process_group
    world = dist.get_world_size(group)
    if world < 2:
        return model
    params = [p for p in model.module.parameters() if p.requires_grad]
    numel = min(sum(p.numel() for p in params),
                model.bucket_bytes_cap // 4 + max((p.numel() for p in params), default=0))
    size = _data_offset(world) + 2 * world * numel * 4
    usable = (os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")
              and platform.machine().lower() in ("x86_64", "amd64")
              and dist.get_backend(group) == "gloo"
              and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
              and size <= MAX_SEGMENT_BYTES and os.path.isdir(SHM_DIR))
    rank = dist.get_rank(group)
    offer: list = [None]
    if rank == 0 and usable:
        offer = [_create_segment(size)]
    dist.broadcast_object_list(offer, src=dist.get_global_rank(group, 0), group=group)
    segment = _open_segment(*offer[0], size) if usable and offer[0] is not None else None
    # (mapped it, process id, process id namespace): a rank waiting for another checks that it lives
    ranks: list = [None] * world
    dist.all_gather_object(ranks, (segment is not None, os.getpid(), _pid_namespace()), group=group)
    if rank == 0 and offer[0] is not None:
        os.unlink(offer[0][0])  # every rank that could has mapped it by now
    if not all(mapped for mapped, _, _ in ranks) or len({ns for _, _, ns in ranks}) != 1 or ranks[0][2] is None:
        if segment is not None:
            segment.close()
        return model
    pids = [pid for _, pid, _ in ranks]
    model.host_average = _HostAverage(segment, group, rank, world, numel, pids)  # for inspection
    model.register_comm_hook(model.host_average, _HostAverage.hook)
    return model


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (in this process's pid namespace): exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _data_offset(world: int) -> int:
    return -(-(HEADER + FLAG_STRIDE * world) // PAGE) * PAGE


def _create_segment(size: int) -> tuple[str, bytes] | None:
    """A new file of `size` bytes in /dev/shm, its room reserved (so a full /dev/shm fails here, not
    as a SIGBUS mid-step), with a random token in its header; None where that fails."""
    token = secrets.token_bytes(16)
    path = os.path.join(SHM_DIR, f"ditlab-allreduce-{secrets.token_hex(8)}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, token, 0)
    except OSError:
        os.close(fd)
        os.unlink(path)
        return None
    os.close(fd)
    return path, token


def _open_segment(path: str, token: bytes, size: int) -> mmap.mmap | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None
        segment = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    if segment[:len(token)] != token:
        segment.close()
        return None
    return segment


class _HostAverage:
    """The hook's state: this rank's view of the segment. Call k (counted across buckets and steps,
    which come in the same order on every rank) writes this rank's bucket, divided by the world
    size, into its slot k % 2, then sets the rank's counter to k; once every counter reaches k, it
    sums the ranks' slots in rank order. A rank writes slot k % 2 again at call k + 2 only after every
    other rank has written call k + 1, which each does after reading call k: no slot is overwritten
    while another rank still reads it. A bucket larger than a slot (not expected: DDP's cap bounds
    them) goes through gloo; its size is the same on every rank, so every rank does."""

    def __init__(self, segment: mmap.mmap, group, rank: int, world: int, numel: int, pids: list[int]):
        self.segment, self.group, self.rank, self.world, self.numel = segment, group, rank, world, numel
        self.pids = pids
        self.counters = np.frombuffer(segment, dtype=np.int64, count=FLAG_STRIDE // 8 * world,
                                      offset=HEADER)[::FLAG_STRIDE // 8]
        self.slots = torch.frombuffer(segment, dtype=torch.float32, offset=_data_offset(world),
                                      count=2 * world * numel).view(2, world, numel)
        self.calls = self.through_gloo = 0  # buckets averaged here, and larger ones sent to gloo

    @staticmethod
    def hook(state, bucket):  # no annotations: DDP checks them as objects, and this module's are strings
        return state.average(bucket)

    def average(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        grads = bucket.buffer()
        if grads.numel() > self.numel:
            self.through_gloo += 1
            work = dist.all_reduce(grads.div_(self.world), group=self.group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])
        self.calls += 1
        slots = self.slots[self.calls % 2, :, :grads.numel()]
        torch.div(grads, self.world, out=slots[self.rank])
        self.counters[self.rank] = self.calls
        self._wait_for_others()
        # Into the bucket itself, already copied out (DDP then has nothing to copy back): the first two
        # slots' sum in one pass, where a copy and an add took two (the same numbers).
        torch.add(slots[0], slots[1], out=grads)
        for r in range(2, self.world):
            grads.add_(slots[r])
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(grads)
        return future

    def _wait_for_others(self) -> None:
        """Until every rank has written this call. Where gloo would fail on a closed connection, a
        rank whose process has ended fails the wait (in words `lost_peer_error` reads as a lost
        peer), so the survivors end as they do with gloo, not at the timeout."""
        spins, since = 0, None
        while self.counters.min() < self.calls:
            spins += 1
            if spins <= 200:
                continue
            time.sleep(0 if spins <= 2000 else 1e-4)  # lets the process's other threads run
            if spins % 1000 == 0:
                since = since or time.monotonic()
                late = [r for r in range(self.world) if self.counters[r] < self.calls]
                for r in late:
                    if not _alive(self.pids[r]):
                        raise RuntimeError(f"rank {r}'s process ({self.pids[r]}) ended while rank {self.rank} "
                                           "waited for its gradients in shared memory (a remote worker crash)")
                if time.monotonic() - since > WAIT_TIMEOUT_S:
                    raise RuntimeError(f"rank {self.rank} waited {WAIT_TIMEOUT_S:.0f} s for the gradients of "
                                       f"rank(s) {late} in shared memory (call {self.calls})")
