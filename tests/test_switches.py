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


# -- train.matmul_precision ------------------------------------------------------------------------

def test_attention_runs_its_kernels_with_fp32_products_when_the_step_multiplies_in_bf16():
    """Under `medium` the linear layers may multiply in bf16 (on CPUs with bf16 matrix instructions);
    the CPU attention kernels, forward and backward, run with oneDNN's fp32 products (under bf16
    products they ran 16-24x slower), and give the numbers they give without the setting."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ditlab.models.attention import scaled_dot_product_attention
    from ditlab.training.precision import cpu_has_bf16_products, matmul_precision

    class KernelPrecisions(TorchDispatchMode):
        """Records oneDNN's fp32 product setting at each attention kernel, as it runs."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.name():
                self.seen.append((func.name().split("::")[1], torch.backends.mkldnn.matmul.fp32_precision))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 4, 16, 32, generator=g, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(8, 4, 16, 32, generator=g)

    def run(fn):
        out = fn(q, k, v)
        return out.detach(), torch.autograd.grad(out, (q, k, v), grad_out)

    ref_out, ref_grads = run(torch.nn.functional.scaled_dot_product_attention)
    x, w = torch.randn(256, 128, generator=g), torch.randn(128, 128, generator=g)
    with matmul_precision("medium", torch.device("cpu")), KernelPrecisions() as spy:
        out, grads = run(scaled_dot_product_attention)
        products = x @ w
    kernels = {name for name, _ in spy.seen}
    assert any("backward" in name for name in kernels) and any("backward" not in name for name in kernels)
    assert {setting for _, setting in spy.seen} == {"ieee"}
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    if cpu_has_bf16_products():  # the setting did reach the linear layers around attention
        assert not torch.equal(products, x @ w)
    assert torch.get_float32_matmul_precision() == "highest"


def test_matmul_precision_holds_for_the_training_step_only(monkeypatch):
    from ditlab.training.precision import effective_precision
    from ditlab.training.tasks.generation import GenerationTask

    seen = []
    step = GenerationTask.step

    def spy(self, *args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(GenerationTask, "step", spy)
    train(tiny("train.matmul_precision=medium"), LocalReporter())
    assert seen == [effective_precision("medium", torch.device("cpu"))] * 2
    assert torch.get_float32_matmul_precision() == "highest"  # validation and what follows: fp32


def test_an_unknown_matmul_precision_is_a_spec_error_naming_the_field():
    with pytest.raises(SpecError, match="train.matmul_precision"):
        load(TINY, ["train.matmul_precision=low"])


def test_attention_outside_any_setting_is_torchs_own():
    """With no setting made (torch's "none": fp32 products), attention is the plain kernel, not the
    wrapper, so it keeps everything the plain kernel allows (a second backward, for one)."""
    import subprocess
    import sys

    probe = ("import torch; from ditlab.models.attention import scaled_dot_product_attention as a; "
             "q = torch.randn(2, 2, 4, 8, requires_grad=True); "
             "print(torch.backends.mkldnn.matmul.fp32_precision, type(a(q, q, q).grad_fn).__name__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    setting, node = done.stdout.split()
    assert setting == "none" and "Fp32Attention" not in node, done.stdout
