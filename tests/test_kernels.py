"""ditlab.kernels: the compiled GELU computes torch's function, forward and backward, and falls back
to torch's where it does not apply."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from ditlab import kernels


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel-cache"))
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


def gelu_and_grad(fn, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def torchs(x):
    return F.gelu(x, approximate="tanh")


@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_computes_gelu_forward_and_backward_as_closely_as_torch(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        # 3 * (4099 * 5 + 1) elements: not a multiple of the kernel's pieces or of any vector width;
        # values up to |x| = 40, where the sigmoid saturates and the exponent is clamped.
        x = torch.randn(3, 4099 * 5 + 1, generator=g) * torch.tensor([1.0, 4.0, 40.0]).unsqueeze(1)
        grad = torch.randn(x.shape, generator=g)
        assert kernels.uses_kernel(x)
        ours, ours_grad = gelu_and_grad(kernels.gelu_tanh, x, grad)
        theirs, theirs_grad = gelu_and_grad(torchs, x, grad)
    finally:
        torch.set_num_threads(before)
    exact, exact_grad = gelu_and_grad(torchs, x.double(), grad.double())
    assert not torch.equal(ours, theirs)  # the kernel ran: a different computation of the same function
    scale = x.double().abs().clamp_min(1.0)  # float rounding of values up to 40
    assert ((ours - exact).abs() / scale).max().item() < 2e-7
    assert ((ours - exact).abs() / scale).max() <= 1.5 * ((theirs - exact).abs() / scale).max()
    # torch's backward loses up to 2e-6 where 1 + tanh cancels (x near -5); the kernel does not.
    assert (ours_grad - exact_grad).abs().max().item() < 1e-6
    assert (ours_grad - exact_grad).abs().max() <= (theirs_grad - exact_grad).abs().max()


def test_a_strided_input_gives_the_same_values_as_its_contiguous_copy():
    x = torch.randn(64, 96).t()
    assert not x.is_contiguous()
    assert torch.equal(kernels.gelu_tanh(x), kernels.gelu_tanh(x.contiguous()))


def test_nan_stays_nan_and_infinities_keep_their_limits():
    y = kernels.gelu_tanh(torch.tensor([float("nan"), float("inf"), 0.0, -0.0, 30.0, -30.0]))
    assert torch.isnan(y[0])
    assert y[1].item() == float("inf")
    assert y[2].item() == 0.0 and y[3].item() == 0.0 and y[4].item() == 30.0
    assert -1e-30 < y[5].item() <= 0.0


def test_other_dtypes_and_the_opt_out_use_torchs_gelu(monkeypatch):
    x = torch.randn(50, 50)
    assert not kernels.uses_kernel(x.to(torch.bfloat16))
    assert torch.equal(kernels.gelu_tanh(x.to(torch.bfloat16)), torchs(x.to(torch.bfloat16)))
    monkeypatch.setenv(kernels.OPT_OUT, "0")
    kernels.library.cache_clear()
    assert kernels.library() is None and not kernels.uses_kernel(x)
    assert torch.equal(kernels.gelu_tanh(x), torchs(x))


def test_a_compiler_that_fails_turns_the_kernel_off_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 at `--version`
    with caplog.at_level(logging.WARNING, logger="ditlab.kernels"):
        assert kernels.library() is None
    assert "CPU kernels are off" in caplog.text
    x = torch.randn(10)
    assert torch.equal(kernels.gelu_tanh(x), torchs(x))
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.partial"))


def test_the_library_is_built_once_per_cache_and_named_by_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path))
    first = kernels.build()
    mtime = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == mtime  # taken from the cache
    assert first.parent == tmp_path / "kernels" and first.name.startswith("gelu_tanh-")
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left
    monkeypatch.setattr(kernels, "_cpu_identity", lambda: "another CPU")
    assert kernels.build() != first  # a library built for another CPU is never reused
