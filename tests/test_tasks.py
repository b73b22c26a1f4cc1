"""The Task seam and the loop around it: old checkpoints still load and sample, the task registry
matches the spec, each rank trains on its own shard, and resume is exact with 2 DDP ranks."""

import json
import typing

import pytest
import torch

from ditlab import cli
from ditlab.config import ExperimentSpec, load
from ditlab.sampling import balanced_labels, generate, load_for_sampling
from ditlab.training import LocalReporter, train
from ditlab.training.loop import ShardSampler
from ditlab.training.tasks import TASKS, GenerationTask, task_class

from conftest import ROOT
from ddp import run_then_resume_on_two_ranks, same_parameters

TINY = ROOT / "experiments" / "tiny.yaml"
LEGACY = ROOT / "tests" / "data" / "legacy_checkpoint"


def test_a_checkpoint_written_before_the_task_seam_samples_the_same_images():
    """tests/data/legacy_checkpoint was written at commit 257be36, before tasks existed; its bundle
    has no task_state and its spec no `task` field. The same images to float rounding: bit for bit
    on the CPU that wrote them, up to 1.2e-7 on a Xeon with AMX (2 December), whose fp32 kernels
    round differently. Sampling the raw weights instead of the EMA's moves them by 0.014, one more
    DDIM step by 0.23."""
    ckpt = load_for_sampling(LEGACY, "ema")
    assert ckpt.spec.task == "generation" and ckpt.step == 2
    images = generate(ckpt, balanced_labels(4, 10), "ddim", 3, 2.0, seed=0, batch_size=4)
    torch.testing.assert_close(images, torch.load(LEGACY / "expected_samples.pt"), rtol=0, atol=1e-6)


def test_a_checkpoint_written_before_the_task_seam_resumes_and_is_evaluated_by_its_task(tmp_path, capsys):
    spec = load(TINY, ["resources.num_workers=1", "train.steps=3", "train.checkpoint_every=3",
                       "name=pre-task-seam"])
    reporter = LocalReporter(tmp_path)
    state = train(spec, reporter, resume_from=str(LEGACY / "checkpoint.pt"))
    assert state.step == 3 and [h["step"] for h in reporter.history if "loss" in h] == [3]
    code = cli.main(["sample", str(LEGACY), "--num", "3", "--steps", "2", "--out", str(tmp_path / "s"), "--json"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)["files"]) == 3


def test_the_task_registry_is_what_the_spec_accepts():
    accepted = typing.get_args(ExperimentSpec.model_fields["task"].annotation)
    assert set(accepted) == set(TASKS) and task_class("generation") is GenerationTask
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        task_class("nope")


@pytest.mark.parametrize("num_images,world_size,local_batch", [(10, 2, 2), (11, 3, 2), (7, 2, 8)])
def test_ranks_read_disjoint_shards_that_cover_the_dataset_each_epoch(num_images, world_size, local_batch):
    """DistributedSampler's contract: per epoch one permutation, padded to a multiple of the ranks by
    repeating its head; rank r takes every world_size-th index from r."""
    samplers = [ShardSampler(num_images, local_batch, seed=5, rank=r, world_size=world_size)
                for r in range(world_size)]
    steps = samplers[0].steps_per_epoch
    for epoch in (0, 1):
        shards = [s.shard(epoch) for s in samplers]
        union = torch.cat(shards).tolist()
        assert set(union) == set(range(num_images))  # every image, every epoch
        if num_images % world_size == 0 and local_batch <= num_images // world_size:
            assert len(set(union)) == len(union)  # no image on two ranks
        for sampler, shard in zip(samplers, shards, strict=True):
            batches = [sampler.indices(epoch * steps + k) for k in range(steps)]
            assert all(len(b) == local_batch for b in batches)
            assert torch.equal(torch.cat(batches), shard[: steps * local_batch])  # the shard in order
    first, second = samplers[0].shard(0), samplers[0].shard(1)
    assert not torch.equal(first, second)  # a new order each epoch
    again = ShardSampler(num_images, local_batch, seed=5, rank=0, world_size=world_size)
    assert torch.equal(again.indices(steps + 1), samplers[0].indices(steps + 1))  # a function of the step


def _tiny_ddp_record(rank, spec, full, end_full, resumed, end_resumed) -> dict:
    return {"full": [h["loss"] for h in full.history if "loss" in h],
            "resumed": [h["loss"] for h in resumed.history if "loss" in h],
            "resumed_steps": [h["step"] for h in resumed.history if "loss" in h],
            "same_weights": same_parameters(end_full.ema.model, end_resumed.ema.model),
            "first_batch": full_first_batch(spec, rank)}


def full_first_batch(spec, rank: int) -> list[int]:
    sampler = ShardSampler(1437, spec.train.batch_size // 2, spec.seed, rank, 2)
    return sampler.indices(0).tolist()


def test_resume_is_exact_with_two_ddp_ranks(tmp_path):
    """Two real gloo ranks (no Ray): interrupted at the step-3 checkpoint and resumed, both ranks
    report the losses of the uninterrupted run for steps 4..6 and end with its EMA weights; the
    ranks trained on different images."""
    # Dropout draws from the global RNG: each rank must resume its own.
    spec = load(TINY, ["train.log_every=1", "model.dropout=0.1"])
    ranks = run_then_resume_on_two_ranks(spec, tmp_path, _tiny_ddp_record)
    for record in ranks:
        assert record["resumed_steps"] == [4, 5, 6]
        assert record["resumed"] == record["full"][3:]
        assert record["same_weights"]
    assert ranks[0]["full"] == ranks[1]["full"]  # losses are averaged across ranks
    assert not set(ranks[0]["first_batch"]) & set(ranks[1]["first_batch"])
    # Every parameter is DDP's: the guard decides from the averaged gradients, and the loop adds no
    # collective of its own to the steps (each rank's loss verdict was one all-reduce a step)
    assert [r["loop_collectives"] for r in ranks] == [0, 0]
