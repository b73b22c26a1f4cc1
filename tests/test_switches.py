"""The memory and speed switches of `train` (issue 14): gradient accumulation, gradient checkpointing
and torch.compile change how a step is computed, never what it computes."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from ditlab.config import SpecError, load
from ditlab.models import build_model
from ditlab.training import LocalReporter, train

TINY = ROOT / "experiments" / "tiny.yaml"


def tiny(*overrides):
    return load(TINY, ["resources.num_workers=1", "train.log_every=1", "train.steps=2", *overrides])


def test_two_micro_batches_make_the_same_step_as_one_batch():
    """Same batch, noise and timesteps: the summed micro-batch gradients are the batch gradient, so
    the gradient norm and the losses agree to float rounding (both steps of the run)."""
    whole, split = LocalReporter(), LocalReporter()
    train(tiny(), whole)
    train(tiny("train.grad_accumulation=2"), split)
    for a, b in zip(whole.history, split.history, strict=True):
        for key in ("loss", "mse", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_gradient_checkpointing_recomputes_the_same_gradients():
    torch.manual_seed(0)
    model = build_model("DiT-N/2", input_size=8, in_channels=1, num_classes=10).train()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)  # no zero-initialised layer: every block's recomputation matters
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 20, 50, 90]), torch.tensor([0, 1, 2, 3])

    def gradients(recompute: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.gradient_checkpointing = recompute
        model(x, t, y).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    kept, recomputed = gradients(False), gradients(True)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(kept, recomputed, strict=True))


def test_the_switches_reach_the_trained_model():
    state = train(tiny("train.steps=1", "train.grad_checkpointing=true"), LocalReporter())
    assert state.task.model.gradient_checkpointing is True


@pytest.mark.parametrize("overrides, match", [
    (["train.grad_accumulation=9", "train.batch_size=16"], "exceed each worker's 8 images"),
    (["task=autoencoder", "train.grad_accumulation=2"], "micro-batches are for task generation"),
])
def test_bad_switches_are_spec_errors_naming_the_field(overrides, match):
    with pytest.raises(SpecError, match=f"train.grad_accumulation: .*{match}"):
        load(TINY, overrides)
