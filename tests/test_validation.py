"""Validation loss: a fixed held-out set, fixed noise and timesteps, reported by the plain loop."""

import pytest
import torch

from ditlab.config import load
from ditlab.training import LocalReporter, train
from ditlab.builders import build_diffusion
from ditlab.training.loop import TrainingDiverged
from ditlab.training.validation import validation_loss, validation_set

from conftest import ROOT

TINY = ROOT / "experiments" / "tiny.yaml"


def tiny(*overrides):
    return load(TINY, ["resources.num_workers=1", "train.val_images=24", *overrides])


def test_validation_set_is_fixed_and_independent_of_the_run_seed():
    a = validation_set(tiny().data, 24)
    b = validation_set(tiny("seed=7").data, 24)
    assert len(a) == 24
    for x, y in ((a.x0, b.x0), (a.y, b.y), (a.fraction, b.fraction), (a.noise, b.noise)):
        assert torch.equal(x, y)
    # Stratified: one timestep in each 1/24 of [0, 1).
    assert torch.equal((a.fraction.sort().values * 24).floor(), torch.arange(24.0))


def test_validation_set_takes_at_most_the_test_split():
    spec = tiny("data.test_fraction=0.05")  # 90 test images of the 1797 digits
    assert len(validation_set(spec.data, 10_000)) == 90
    assert validation_set(spec.data, 0) is None


def test_loop_reports_val_loss_at_validation_steps_and_at_the_end():
    r = LocalReporter()
    train(tiny("train.log_every=2", "train.val_every=4"), r)
    # Training loss at the log steps and the checkpoint step (3), as before validation existed.
    assert [h["step"] for h in r.history if "loss" in h] == [2, 3, 4, 6]
    assert [h["step"] for h in r.history if "val_loss" in h] == [4, 6]


def test_val_every_defaults_to_log_every_and_zero_images_turn_it_off():
    r, off = LocalReporter(), LocalReporter()
    train(tiny(), r)
    train(tiny("train.val_images=0"), off)
    assert [h["step"] for h in r.history if "val_loss" in h] == [2, 4, 6]
    assert not any("val_loss" in h for h in off.history)
    assert [h["loss"] for h in r.history] == [h["loss"] for h in off.history]  # validation changes no training


def test_val_loss_is_deterministic_and_uses_the_chosen_weights():
    ema = LocalReporter()
    state = train(tiny(), ema)
    again = LocalReporter()
    train(tiny(), again)
    assert [h["val_loss"] for h in ema.history if "val_loss" in h] == [h["val_loss"] for h in again.history
                                                                       if "val_loss" in h]
    val = validation_set(state.spec.data, 24)
    diffusion = build_diffusion(state.spec)
    final = ema.history[-1]["val_loss"]
    assert validation_loss(state.ema.model, diffusion, val, torch.device("cpu")) == pytest.approx(final, rel=1e-12)
    assert validation_loss(state.model, diffusion, val, torch.device("cpu"), chunk=5) != pytest.approx(final)
    raw = LocalReporter()
    train(tiny("train.val_weights=model"), raw)
    assert raw.history[-1]["val_loss"] == pytest.approx(
        validation_loss(state.model, diffusion, val, torch.device("cpu")), rel=1e-9)


def test_a_diverging_run_stops_with_an_error():
    # Each non-finite step is skipped (test_faults.py); train.max_bad_steps of them in a row stop the run.
    with pytest.raises(TrainingDiverged, match="training loss is (nan|inf) at step"):
        train(tiny("train.lr=1e30", "train.max_bad_steps=2"), LocalReporter())
