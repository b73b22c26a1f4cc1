"""Benchmark: a training worker's memory and speed on a shard set streamed through Ray Data, at two
sizes, against the in-memory path (issue 19, part 3).

    python benchmarks/data_memory.py [--sizes 10000,500000] [--steps 60] [--workers 1] [--out FILE]

Writes synthetic shard sets of random 32x32x3 uint8 images (10 classes, 10k images a shard) into a
temporary folder (500k images: 1.5 GB on disk, deleted at the end), then trains the quickstart
model (experiments/quickstart.yaml: DiT-Ti/4, 64 images a worker a step) on each set twice through
Ray Train and the real training loop: streamed (`data.format: shards`, the default) and held in
memory (`data.stream: false`, the whole train split as one float32 tensor per worker). Each worker
reports its peak RSS (getrusage: the most resident memory the process ever had, object-store pages
it mapped included) and its images/s over the steps after the first report window (start-up and
warm-up left out). Targets: peak RSS of a streaming worker within 10% between the sizes; streamed
images/s within 10% of in-memory at the same batch.

The in-memory run at a size is skipped when it would not fit: it needs at most 6 bytes per pixel
value per worker (the shards and the uint8 split they are joined into, then float32 beside the
uint8 while converting), 9.2 GB for 500k images (8.1 GB peak measured, the worker's own included).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import ISSUE_14_MODEL, header, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "quickstart.yaml"
SHARD = 10_000
TEST_IMAGES = 1_000


def synthetic_set(out: Path, images: int, seed: int = 0) -> Path:
    """A shard set of `images` random 32x32x3 train images (+ a small test split), shard by shard."""
    from ditlab.data.shards import write_shards

    def chunks(count: int, offset: int):
        for start in range(0, count, SHARD):
            rng = np.random.default_rng([seed, offset + start])
            n = min(SHARD, count - start)
            yield rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64)

    write_shards(out, {"train": chunks(images, 0), "test": chunks(TEST_IMAGES, images)}, [str(c) for c in range(10)],
                 {"resolution": 32, "channels": 3, "test_fraction": 0.2, "split_seed": 0})
    return out


class Recorder:
    """The loop's Reporter here: keeps (step, time) of every report; drops checkpoints."""

    replays_reports = False

    def __init__(self):
        self.reports: list[tuple[int, float]] = []

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append((int(metrics["step"]), time.perf_counter()))


def worker(config: dict) -> None:
    """A Ray Train worker: the real loop on this spec, then its peak RSS and images/s to a file."""
    import ray.train
    import torch

    from ditlab.config import from_dict
    from ditlab.orchestration.trainer import streams
    from ditlab.training.loop import Placement, train

    spec = from_dict(config["spec"], "benchmark spec")
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    placement = Placement(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                          wrap_model=ray.train.torch.prepare_model,
                          stream=ray.train.get_dataset_shard("train") if streams(spec) else None)
    recorder = Recorder()
    train(spec, recorder, placement)
    (first_step, first_time), (last_step, last_time) = recorder.reports[0], recorder.reports[-1]
    local_batch = spec.train.batch_size // placement.world_size
    result = {"rank": placement.rank, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "images_per_sec": (last_step - first_step) * local_batch / (last_time - first_time)}
    Path(config["out"], f"rank{placement.rank}.json").write_text(json.dumps(result))


def run(data_dir: Path, images: int, stream: bool, args, scratch: Path) -> dict:
    """One training run through Ray Train; the mean of its workers' figures."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ditlab.config import load
    from ditlab.orchestration.preflight import preflight
    from ditlab.orchestration.trainer import stream_datasets, worker_spec

    spec = load(SPEC, [
        ISSUE_14_MODEL, "data.format=shards", f"data.path={data_dir}", "data.resolution=32", "data.channels=3",
        f"data.stream={str(stream).lower()}", f"train.steps={args.steps}", "train.log_every=10",
        f"train.checkpoint_every={args.steps}", "train.val_images=0", "train.eval_every=null",
        f"train.batch_size={64 * args.workers}", f"resources.num_workers={args.workers}"])
    tic = time.perf_counter()
    preflight(spec)  # checksums: hashed once per shard, then cached
    checked = time.perf_counter() - tic
    out = Path(tempfile.mkdtemp(dir=scratch))
    trainer = TorchTrainer(worker, train_loop_config={"spec": worker_spec(spec), "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"bench-{images}-{stream}", storage_path=str(scratch / "ray")),
                           **stream_datasets(spec))
    tic = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - tic
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {"path": "streamed" if stream else "in-memory", "images": images,
            "peak_rss_mb": statistics.mean(r["peak_rss_mb"] for r in ranks),
            "images_per_sec": statistics.mean(r["images_per_sec"] for r in ranks),
            "fit_s": wall, "preflight_s": checked}


def fits_in_memory(images: int, workers: int) -> bool:
    import psutil

    need = images * 32 * 32 * 3 * 6 * workers
    return need < 0.6 * psutil.virtual_memory().available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,500000", help="train images of each synthetic set")
    parser.add_argument("--steps", type=int, default=60, help="training steps of each run")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (64 images each a step)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()

    from ditlab.orchestration.ray_session import ensure_ray

    ensure_ray(num_cpus=max(2, args.workers))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ditlab-data-memory-") as tmp:
        scratch = Path(tmp)
        for images in (int(s) for s in args.sizes.split(",")):
            tic = time.perf_counter()
            data_dir = synthetic_set(scratch / f"set-{images}", images)
            print(f"wrote {images} images in {time.perf_counter() - tic:.0f} s", file=sys.stderr)
            rows.append(run(data_dir, images, True, args, scratch))
            if fits_in_memory(images, args.workers):
                rows.append(run(data_dir, images, False, args, scratch))
            else:
                rows.append({"path": "in-memory", "images": images, "peak_rss_mb": "skipped: would not fit"})
            shutil.rmtree(data_dir)
    streamed = [r for r in rows if r["path"] == "streamed"]
    print(header("Training worker memory and speed: streamed shards vs in memory (benchmarks/data_memory.py)"))
    print(f"# {args.workers} worker(s), 64 images a worker a step, {args.steps} steps, 32x32x3, DiT-Ti/4")
    print(table(rows, ["path", "images", "peak_rss_mb", "images_per_sec", "fit_s", "preflight_s"]))
    if len(streamed) >= 2:
        growth = streamed[-1]["peak_rss_mb"] / streamed[0]["peak_rss_mb"] - 1
        print(f"streamed peak RSS, {streamed[-1]['images']} vs {streamed[0]['images']} images: {growth:+.1%} "
              f"(target within 10%)")
    for s in streamed:
        mem = next((r for r in rows if r["path"] == "in-memory" and r["images"] == s["images"]
                    and "images_per_sec" in r), None)
        if mem:
            print(f"{s['images']} images: streamed images/s {s['images_per_sec'] / mem['images_per_sec'] - 1:+.1%} "
                  "against in-memory (target within 10%)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
