import math

import pytest
import torch

from ditlab.config import load
from ditlab.training import EMA, CheckpointError, LocalReporter, load_bundle, lr_at, save_bundle, train

from conftest import ROOT

TINY = ROOT / "experiments" / "tiny.yaml"


def tiny(*overrides):
    return load(TINY, ["resources.num_workers=1", "train.log_every=1", *overrides])


def test_resumed_run_has_the_same_loss_curve(tmp_path):
    """Interrupt at step 3 (the checkpoint), resume in a fresh loop: the losses of steps 4..6 equal
    those of the uninterrupted run exactly, and so do the final weights."""
    spec = tiny("model.dropout=0.1")  # dropout draws from the global RNG: its state must resume too
    full = LocalReporter(tmp_path / "full")
    end_full = train(spec, full)
    at_step_3 = next(c for c in full.checkpoints if c.name.endswith("000003"))
    resumed = LocalReporter(tmp_path / "resumed")
    end_resumed = train(spec, resumed, resume_from=str(at_step_3))
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history][3:]
    for a, b in zip(end_full.ema.model.parameters(), end_resumed.ema.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_same_seed_same_run_other_seed_differs():
    a, b, c = LocalReporter(), LocalReporter(), LocalReporter()
    train(tiny("train.steps=3"), a)
    train(tiny("train.steps=3"), b)
    train(tiny("train.steps=3", "seed=1"), c)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["loss"] for h in a.history] != [h["loss"] for h in c.history]


def test_bf16_autocast_trains():
    r = LocalReporter()
    train(tiny("train.steps=2", "train.precision=bf16"), r)
    assert all(math.isfinite(h["loss"]) for h in r.history)


def test_loss_decreases_on_digits():
    r = LocalReporter()
    train(load(TINY, ["resources.num_workers=1", "train.steps=40", "train.log_every=10", "train.lr=2e-3",
                      "train.batch_size=64"]), r)
    assert r.history[-1]["loss"] < 0.8 * r.history[0]["loss"]


def test_lr_schedule_warmup_then_cosine():
    t = tiny("train.steps=110", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1").train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    const = tiny("train.lr_schedule=constant", "train.warmup_steps=0").train
    assert lr_at(5, const) == const.lr


def test_ema_update_and_warmup():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9, warmup=False)
    model.weight.data.fill_(1.0)
    ema.update(model)
    assert ema.model.weight.item() == pytest.approx(0.1)
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_ema_foreach_update_matches_a_lerp_per_parameter():
    """EMA.update's one foreach call: bit for bit the per-parameter lerp_ it replaced, buffers copied,
    and a model of another shape refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))
    ema = EMA(model, decay=0.99, warmup=True)
    reference = [p.detach().clone() for p in model.parameters()]
    for step in range(4):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(torch.sin(torch.arange(p.numel(), dtype=torch.float32) * (step + 1) + i).view_as(p))
            model[1].running_mean.add_(step + 1.0)
        decay = ema.current_decay()
        for r, p in zip(reference, model.parameters(), strict=True):
            r.lerp_(p.detach(), 1.0 - decay)
        ema.update(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), reference, strict=True))
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    assert not torch.equal(reference[0], model[0].weight)  # the average lags the weights
    with pytest.raises(ValueError, match="6 parameters .* one with 2"):
        ema.update(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("max_norm", [1e3, 0.5, float("inf")])
def test_clip_grad_norm_gives_torch_clip_grad_norm_bit_for_bit(max_norm):
    """training/optim.clip_grad_norm: the norm torch's clip_grad_norm_ returns and the gradients it
    leaves, exactly: unscaled below max_norm, scaled above it, NaN spread as torch spreads it."""
    from ditlab.training.optim import clip_grad_norm

    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 3, 3), (1,)]
    for poison in (False, True):
        grads = [torch.randn(s) * 0.7 for s in shapes]
        if poison:
            grads[1][3] = float("nan")
        ours, theirs = ([torch.nn.Parameter(torch.zeros(s)) for s in shapes] for _ in range(2))
        for a, b, g in zip(ours, theirs, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        ours.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped, as torch skips it
        norm = clip_grad_norm(ours, max_norm)
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        assert norm == float(expected) or (poison and norm != norm and expected.isnan())
        for a, b in zip(ours[:-1], theirs, strict=True):
            assert torch.equal(a.grad, b.grad) or (poison and torch.equal(a.grad.isnan(), b.grad.isnan()))
        clipped = not poison and max_norm < norm
        assert clipped == (max_norm == 0.5 and not poison)  # the case above the threshold does scale
        # below the threshold the gradients are not written at all (in-place writes bump the version)
        assert all(p.grad._version == 0 for p in ours[:-1]) == (not clipped and not poison)
        if clipped:
            total = torch.nn.utils.get_total_norm([p.grad for p in ours[:-1]])
            assert abs(float(total) - max_norm) < 1e-5
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0.0


def test_checkpoint_bundle_roundtrip_and_integrity(tmp_path):
    r = LocalReporter(tmp_path)
    train(tiny("train.steps=3"), r)
    bundle = load_bundle(r.latest_checkpoint)
    assert bundle["step"] == 3 and bundle["spec"]["name"] == "tiny"
    assert {"model", "ema", "optimizer", "rng", "model_config"} <= set(bundle)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((r.latest_checkpoint / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_bundle(corrupt)
    save_bundle(tmp_path / "foreign.pt", {"step": 1})
    with pytest.raises(CheckpointError, match="lacks"):
        load_bundle(tmp_path / "foreign.pt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_every_task_trains_with_fused_adamw_on_cpu_and_it_steps_like_the_loop():
    """training/optim.adamw: the fused kernel where every parameter allows it, the same update as
    torch's per-parameter loop to float rounding, and the default elsewhere (here: meta tensors)."""
    from ditlab.training.optim import adamw
    from ditlab.training.tasks import task_class

    spec = tiny()
    task = task_class(spec.task)(spec, 10, torch.device("cpu"))
    assert all(group["fused"] for opt in task.optimizers() for group in opt.param_groups)

    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    fused, loop = ([w.clone().requires_grad_(True) for w in weights] for _ in range(2))
    for params, make in ((fused, lambda p: adamw(p, 1e-2, (0.9, 0.95), 0.01)),
                         (loop, lambda p: torch.optim.AdamW(p, 1e-2, (0.9, 0.95), weight_decay=0.01))):
        opt = make(params)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step + i).view_as(p)
            opt.step()
    for a, b in zip(fused, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(fused[0], weights[0])

    assert adamw([torch.empty(3, device="meta", requires_grad=True)], 1e-3, (0.9, 0.999), 0.0).defaults["fused"] is None
