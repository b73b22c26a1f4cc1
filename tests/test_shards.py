"""Sharded datasets (issue 19): `ditlab data add --format shards`, the checks before a run, and the
Ray Data stream each rank trains from (one short 2-rank Ray run: deterministic resume)."""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import pytest

from ditlab import cli
from ditlab.config import DataSpec, from_dict
from ditlab.data import load_dataset
from ditlab.data.digits import load_digits_arrays
from ditlab.data.shards import ShardError, check_shard_set, chunked, read_manifest, read_split, write_shards
from ditlab.data.streaming import ReadShard, epochs_needed

from conftest import ROOT
from test_bad_input import no_ray, refused  # noqa: F401 (no_ray is a fixture)

TINY = str(ROOT / "experiments" / "tiny.yaml")


def digit_shards(out: Path, shard_size: int = 100, train: int = 400, test: int = 50) -> Path:
    """Digits (8x8 grey, as uint8) as a shard set of `train` + `test` images."""
    images, labels = load_digits_arrays()
    images = images[..., None]
    write_shards(out, {"train": chunked(images[:train], labels[:train], shard_size),
                       "test": chunked(images[train:train + test], labels[train:train + test], shard_size)},
                 [str(c) for c in range(10)], {"resolution": 8, "channels": 1, "test_fraction": 0.2, "split_seed": 0})
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_data_add_writes_the_split_training_would_see(tmp_path, monkeypatch):
    """The shards hold, image for image, the train and test splits the in-memory path loads from
    the same folder at the same resolution (the train split shuffled: no shard of one class); the
    manifest counts, classes and checksums them."""
    from PIL import Image

    images, labels = load_digits_arrays()
    for i in range(60):  # 6 per class
        folder = tmp_path / "incoming" / f"digit{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["data", "add", "incoming", "--name", "d", "--no-dvc", "--format", "shards",
                     "--resolution", "8", "--shard-size", "20", "--json"]) == 0
    manifest = read_manifest("data/d")
    assert manifest["counts"] == {"train": 48, "test": 12} and manifest["image_shape"] == [8, 8, 1]
    assert [len(manifest["shards"][s]) for s in ("train", "test")] == [3, 1]
    assert manifest["classes"] == sorted(f"digit{c}" for c in set(labels[:60]))
    spec = DataSpec(source="folder", path="incoming", resolution=8)
    for split in ("train", "test"):
        held = load_dataset(spec, split)
        sharded = load_dataset(DataSpec(format="shards", name="d", resolution=8), split)
        pairs = sorted(zip(map(bytes, sharded.to_uint8()), sharded.labels.tolist(), strict=True))
        assert pairs == sorted(zip(map(bytes, held.to_uint8()), held.labels.tolist(), strict=True))
    first_shard = load_dataset(DataSpec(format="shards", name="d", resolution=8), "train").labels[:20]
    assert len(set(first_shard.tolist())) >= 8  # a mix of classes (in the folder's order: 5 classes)


def test_checksums_are_hashed_once_per_shard_version(tmp_path, cache, monkeypatch):
    """Sizes are checked on every start, sha256 only for a shard not verified before: a shard
    rewritten with the same size (a new mtime) is hashed again and caught."""
    import ditlab.data.shards as shards

    root = digit_shards(tmp_path / "s")
    for f in root.rglob("*.npz"):  # written a minute ago: older than the stores' mtime resolution
        os.utime(f, (time.time() - 60, time.time() - 60))
    spec = DataSpec(format="shards", path=str(root), resolution=8)
    reads = []
    monkeypatch.setattr(shards, "read_bytes", lambda where, real=shards.read_bytes: reads.append(where) or real(where))
    check_shard_set(spec)
    assert len(reads) == 1 + 5  # the manifest, then each of the 5 shards
    reads.clear()
    check_shard_set(spec)
    assert reads == [f"{root}/manifest.json"]
    shard = root / "train" / "00002.npz"
    data = bytearray(shard.read_bytes())
    data[-30] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"shard '{shard}' does not match its checksum"):
        check_shard_set(spec)
    with pytest.raises(ShardError, match=f"shard '{shard}' does not match its checksum"):
        read_split(str(root), "train")  # a reader checks what it reads too
    # Put back just now: hashed, but not trusted later (S3 keeps mtimes to the second, so a rewrite in
    # the same second would keep its key): the next check hashes it again.
    data[-30] ^= 0xFF
    shard.write_bytes(bytes(data))
    for _ in range(2):
        reads.clear()
        check_shard_set(spec)
        assert reads == [f"{root}/manifest.json", str(shard)]


@pytest.mark.parametrize("case", ["checksum", "shape"])
def test_bad_shards_refused_before_ray(case, tmp_path, cache, monkeypatch, capsys, no_ray):  # noqa: F811
    root = digit_shards(tmp_path / "s")
    monkeypatch.chdir(tmp_path)
    argv = ["run", TINY, "--set", "data.format=shards", "--set", f"data.path={root}", "--set", "data.resolution=8"]
    if case == "checksum":
        shard = root / "test" / "00000.npz"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, other checksum
        shard.write_bytes(bytes(data))
        assert str(shard) in refused(argv, capsys)
    else:
        line = refused([*argv, "--set", "data.channels=3"], capsys)
        assert f"shard set {str(root)!r} holds 8x8x1 images; the spec wants 8x8x3" in line
    assert not (tmp_path / "runs").exists()


def test_block_shuffle_is_seeded_per_epoch(tmp_path):
    """A read task's output depends on (seed, epoch, slot) only; epochs differ in shard order and
    in the order within each shard; every image comes once an epoch."""
    root = digit_shards(tmp_path / "s")
    entries = read_manifest(str(root))["shards"]["train"]
    read = ReadShard(str(root), entries, seed=7)

    def epoch(e):
        return np.concatenate([read({"epoch": [e], "slot": [s]})["index"] for s in range(len(entries))])

    assert np.array_equal(epoch(0), epoch(0))
    assert sorted(epoch(0)) == sorted(epoch(1)) == list(range(400)) and not np.array_equal(epoch(0), epoch(1))
    assert not np.array_equal(epoch(0), np.concatenate([ReadShard(str(root), entries, seed=8)(
        {"epoch": [0], "slot": [s]})["index"] for s in range(len(entries))]))
    images, labels = load_digits_arrays()
    batch = read({"epoch": [1], "slot": [2]})
    assert batch["image"].dtype == np.uint8 and np.array_equal(batch["image"][..., 0], images[batch["index"]])
    assert np.array_equal(batch["label"], labels[batch["index"]])
    assert epochs_needed(steps=10, batch_size=64, num_images=400, world_size=2) == 2  # 6 batches an epoch


def record_batches(config: dict) -> None:
    """Ray Train worker: this rank's batches of a run from step 0, and of the same run resumed at
    `resume_at`, through the loop's own seam (training/loop.py, batch_source)."""
    import ray.train

    from ditlab.training.loop import Placement, batch_source

    ctx = ray.train.get_context()
    spec = from_dict(config["spec"], "test spec")
    placement = Placement(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                          stream=ray.train.get_dataset_shard("train"))
    runs = {}
    manifest = read_manifest(spec.data.path)
    for start in (0, config["resume_at"]):
        source = batch_source(spec, placement, None, {"step": start}, manifest)
        runs[start] = [source.batch(step)[2].tolist() for step in range(start, spec.train.steps)]
    Path(config["out"], f"rank{placement.rank}.json").write_text(json.dumps(runs))


@pytest.mark.e2e
def test_two_ranks_stream_and_resume_the_same_batches(ray_session, tmp_path):
    """2 ranks stream a shard set: each sees its own images in an epoch, the next epoch another
    order, and a resumed stream the same batches from its step on."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ditlab.orchestration.trainer import stream_datasets

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    root = digit_shards(tmp_path / "s", shard_size=50)
    spec = from_dict({"data": {"format": "shards", "path": str(root), "resolution": 8},
                      "train": {"steps": 10, "batch_size": 80}, "resources": {"num_workers": 2}}, "test spec")
    datasets = stream_datasets(spec)
    # Ray Data's bars and execution-plan lines would print between ditlab's bar's updates.
    context = datasets["datasets"]["train"].context
    assert not context.enable_progress_bars and not context.print_on_execution_start
    trainer = TorchTrainer(record_batches, train_loop_config={"spec": spec.to_dict(), "resume_at": 7,
                                                              "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="shards", storage_path=str(tmp_path / "ray")),
                           **datasets)
    trainer.fit()
    ranks = [{int(k): v for k, v in json.loads((tmp_path / f"rank{r}.json").read_text()).items()} for r in (0, 1)]
    for runs in ranks:
        assert runs[7] == runs[0][7:] and all(len(b) == 40 for b in runs[0])
    epoch = [sum(runs[0][:5], []) for runs in ranks]  # 400 images, 2 x 5 batches of 40: one epoch
    assert sorted(epoch[0] + epoch[1]) == list(range(400))
    assert sum(ranks[0][0][5:], []) != epoch[0]  # the second epoch comes in another order


def test_the_evaluation_reference_reads_only_the_head_of_a_large_train_split(tmp_path, monkeypatch):
    """The classifier behind conditional accuracy learns from the first CLASSIFIER_TRAIN_LIMIT train
    images of a shard set, read shard by shard: the shards past them are never read (here they are
    corrupt, and the reference is still built). The reference split itself is read whole, as stored."""
    from ditlab.evaluation import suite

    root = digit_shards(tmp_path / "shards")  # 400 train images in shards of 100, 50 test
    for name in ("train/00002.npz", "train/00003.npz"):
        shard = bytearray((root / name).read_bytes())
        shard[len(shard) // 2] ^= 0xFF
        (root / name).write_bytes(bytes(shard))
    with pytest.raises(ShardError, match="00002.npz"):
        read_split(str(root), "train")
    head, head_labels, _ = read_split(str(root), "train", limit=150)
    assert len(head) == len(head_labels) == 150 and head.dtype == np.uint8

    monkeypatch.setattr(suite, "CLASSIFIER_TRAIN_LIMIT", 150)
    ref = suite.dataset_reference(DataSpec(format="shards", path=str(root), resolution=8), "test")
    test_images, test_labels, _ = read_split(str(root), "test")
    assert np.array_equal(ref.images[..., :1], test_images) and np.array_equal(ref.labels, test_labels)
    assert ref.classifier.accuracy(ref.images, ref.labels) > 0.7  # 150 digits teach it most classes
