"""`task: generation` with the adversarial term (loss.adversarial_weight) and sample quality during
training (train.eval_every): the term starts at loss.discriminator_start, weight 0 builds no
discriminator, resume is exact with the discriminator active (one process and two DDP ranks), and
every rank reports the same FID and KID."""


import numpy as np
import pytest
import torch

from ditlab.config import SpecError, load
from ditlab.data import load_dataset
from ditlab.evaluation.features import inception_features
from ditlab.evaluation.images import as_rgb_uint8
from ditlab.training import LocalReporter, train
from ditlab.training.tasks import Batch, GenerationTask

from conftest import ROOT
from ddp import run_then_resume_on_two_ranks, same_parameters

TINY = ROOT / "experiments" / "tiny.yaml"
ADVERSARIAL = ("loss.adversarial_weight=0.5", "loss.discriminator_start=2")
# FID and KID of 20 samples (2 chunks: one a rank) against an 18-image test split, at the last step.
SAMPLE_EVAL = ("train.eval_every=6", "train.eval_samples=20", "data.test_fraction=0.01")


def tiny(*overrides):
    return load(TINY, ["resources.num_workers=1", "train.log_every=1", "train.val_images=0", *overrides])


def test_weight_zero_builds_no_discriminator_and_reports_the_diffusion_terms_only():
    spec = tiny("loss.discriminator_start=0", "loss.discriminator_loss=non_saturating")
    task = GenerationTask(spec, 10, torch.device("cpu"))
    assert task.adversary is None and task.optimizers() == [task.optimizer] and task.extra_state() == {}
    images, labels = load_dataset(spec.data, "train").batch(torch.arange(8))
    figures = task.step(Batch(images, labels), torch.Generator().manual_seed(0))
    assert set(figures) == {"loss", "mse", "grad_norm"}


def test_the_term_starts_at_discriminator_start_and_resume_is_exact(tmp_path):
    """Steps up to the start equal a run without the term (the discriminator draws nothing from
    the step's generator); after it the losses part. Interrupted at step 3 and resumed, the losses,
    the discriminator's figures and both networks' weights equal the uninterrupted run's."""
    plain, full = LocalReporter(), LocalReporter(tmp_path / "full")
    train(tiny("train.steps=4"), plain)
    end_full = train(tiny(*ADVERSARIAL), full)
    losses = [h["loss"] for h in full.history]  # step 3's loss is before its update, the first with the term
    assert losses[:3] == [h["loss"] for h in plain.history][:3] and losses[3] != plain.history[3]["loss"]
    assert [h["d_weight"] > 0 for h in full.history] == [False, False, True, True, True, True]
    resumed = LocalReporter(tmp_path / "resumed")
    end_resumed = train(tiny(*ADVERSARIAL), resumed, resume_from=str(full.checkpoints[0]))
    keys = ("loss", "g_loss", "d_loss", "d_weight", "logits_real")
    assert [[h[k] for k in keys] for h in resumed.history] == [[h[k] for k in keys] for h in full.history][3:]
    for a, b in ((end_full.ema.model, end_resumed.ema.model),
                 (end_full.task.adversary.discriminator, end_resumed.task.adversary.discriminator)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _adversarial_ddp_record(rank, spec, full, end_full, resumed, end_resumed) -> dict:
    keep = ("step", "loss", "d_loss", "g_loss", "fid", "kid")
    return {"full": [{k: h[k] for k in keep if k in h} for h in full.history],
            "resumed": [{k: h[k] for k in keep if k in h} for h in resumed.history],
            "same": same_parameters(end_full.ema.model, end_resumed.ema.model)
            and same_parameters(end_full.task.adversary.discriminator, end_resumed.task.adversary.discriminator)}


def test_two_ddp_ranks_resume_exactly_and_report_the_same_sample_quality(tmp_path, monkeypatch):
    """Two gloo ranks, both networks DDP-wrapped: the full run, then a run resumed from rank 0's
    step-3 checkpoint. The reference-feature cache starts empty, so the full run's ranks extract
    the test split's features together (rank 0 stores them) and the resumed run reads them."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(cache))  # the spawned ranks inherit it
    spec = load(TINY, ["train.log_every=1", "train.val_images=0", *ADVERSARIAL, *SAMPLE_EVAL])
    ranks = run_then_resume_on_two_ranks(spec, tmp_path, _adversarial_ddp_record)
    assert ranks[0] == ranks[1]  # losses are averaged across ranks, figures broadcast from rank 0
    record = ranks[0]
    assert record["same"] and record["resumed"] == record["full"][3:]
    scored = [h for h in record["full"] if "fid" in h]
    assert [h["step"] for h in scored] == [6] and scored[0]["fid"] > 0 and "kid" in scored[0]
    # The entry the two ranks wrote holds every test image's features, in the split's order.
    (stored,) = (cache / "reference").glob("*.npy")
    images = as_rgb_uint8(load_dataset(spec.data, "test").to_uint8())
    assert np.allclose(np.load(stored), inception_features(images), atol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["task=autoencoder", "train.eval_every=10"], "train.eval_every: task autoencoder does not score samples"),
    (["train.eval_every=10", "train.eval_samples=5"], "train.eval_samples: 5 is below evaluation.kid.subset_size"),
    (["train.eval_every=0"], "train.eval_every"),
    (["loss.adversarial_weight=-0.1"], "loss.adversarial_weight"),
])
def test_bad_settings_name_the_field(overrides, message):
    with pytest.raises(SpecError, match=message):
        load(TINY, overrides)
