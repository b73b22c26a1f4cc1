"""ditlab.kernels: the compiled kernels compute torch's functions, forward and backward, as closely as
torch does, and fall back to torch's operations where they do not apply."""

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


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def torch_linear_gelu(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def torch_norm_modulate(x, shift, scale, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def torch_gated_add(x, gate, h, bias):
    return x + gate.unsqueeze(1) * (h + bias)


OURS = {"linear_gelu": kernels.linear_gelu, "norm_modulate": lambda *a: kernels.norm_modulate(*a, 1e-6),
        "gated_add": kernels.gated_add}
TORCHS = {"linear_gelu": torch_linear_gelu, "norm_modulate": torch_norm_modulate, "gated_add": torch_gated_add}
NODES = {"linear_gelu": "_LinearGeluBackward", "norm_modulate": "_NormModulateBackward",
         "gated_add": "_GatedAddBackward"}


def values_and_grads(fn, inputs, grad):
    """fn's value and its inputs' gradients, and the name of the autograd node that made the value."""
    inputs = [t.clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in inputs], type(y.grad_fn).__name__


def gelu_through_identity(x):
    """GELU alone, through linear_gelu with an identity weight and a zero bias (an exact product)."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return kernels.linear_gelu(x, eye, torch.zeros(x.shape[-1], dtype=x.dtype))


def test_gelu_forward_and_backward_are_as_close_to_the_exact_function_as_torchs(threads):
    g = torch.Generator().manual_seed(0)
    # 3 rows of 1031: not a multiple of any vector width; values up to |x| = 40, where the sigmoid
    # saturates and the exponent is clamped.
    x = torch.randn(3, 1031, generator=g) * torch.tensor([1.0, 4.0, 40.0]).unsqueeze(1)
    grad = torch.randn(x.shape, generator=g)
    (ours, ours_grad), node = values_and_grads(gelu_through_identity, [x], grad)
    (theirs, theirs_grad), _ = values_and_grads(lambda x: F.gelu(x, approximate="tanh"), [x], grad)
    (exact, exact_grad), _ = values_and_grads(lambda x: F.gelu(x, approximate="tanh"), [x.double()], grad.double())
    assert node == "_LinearGeluBackward"  # the kernel ran, not torch
    scale = x.double().abs().clamp_min(1.0)  # float rounding of values up to 40
    assert ((ours - exact).abs() / scale).max().item() < 2e-7
    assert ((ours - exact).abs() / scale).max() <= 1.5 * ((theirs - exact).abs() / scale).max()
    # torch's backward loses up to 2e-6 where 1 + tanh cancels (x near -5); the kernel does not.
    assert (ours_grad - exact_grad).abs().max().item() < 1e-6
    assert (ours_grad - exact_grad).abs().max() <= (theirs_grad - exact_grad).abs().max()


def test_gelu_keeps_nan_and_its_limits():
    y = gelu_through_identity(torch.tensor([[0.0, -0.0, 30.0, -30.0, 1e4, -1e4], [float("nan")] + [1.0] * 5]))
    assert y[0, :3].tolist() == [0.0, 0.0, 30.0] and -1e-30 < y[0, 3].item() <= 0.0
    assert y[0, 4].item() == 1e4 and -1e-30 < y[0, 5].item() <= 0.0
    assert torch.isnan(y[1]).all()  # NaN times the identity's zeros spreads over the row; it never vanishes


@pytest.mark.parametrize("shape", [(3, 5, 77), (1, 16, 384)], ids=["odd sizes", "one sample"])
@pytest.mark.parametrize("name", ["linear_gelu", "norm_modulate", "gated_add"])
def test_each_kernel_computes_torchs_function_forward_and_backward(name, shape, threads):
    b, n, c = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3 + 1  # a mean and a scale for LayerNorm to remove
    rows = torch.randn(2 * b, c, generator=g)  # per-sample rows, views of one tensor as adaLN's chunks are
    if name == "linear_gelu":
        hidden = 2 * c + 3
        inputs = [x, torch.randn(hidden, c, generator=g) / c**0.5, torch.randn(hidden, generator=g)]
        grad = torch.randn(b, n, hidden, generator=g)
    else:
        h, bias = torch.randn(shape, generator=g), torch.randn(c, generator=g)
        inputs = [x, rows[:b], rows[b:]] if name == "norm_modulate" else [x, rows[:b], h, bias]
        grad = torch.randn(shape, generator=g)
    assert kernels.uses_kernel(*inputs)
    ours, node = values_and_grads(OURS[name], inputs, grad)
    theirs, _ = values_and_grads(TORCHS[name], inputs, grad)
    exact, _ = values_and_grads(TORCHS[name], [t.double() for t in inputs], grad.double())
    assert node == NODES[name]
    for which, mine, torchs_value, truth in zip(["value"] + [f"grad {i}" for i in range(len(inputs))], ours, theirs,
                                                 exact, strict=True):
        ours_error, torchs_error = (mine - truth).abs().max().item(), (torchs_value - truth).abs().max().item()
        assert ours_error <= max(4 * torchs_error, 2e-6), (which, ours_error, torchs_error)


def test_a_gated_add_without_a_bias_adds_none():
    x, gate, h = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 3, 8)
    assert torch.allclose(kernels.gated_add(x, gate, h), x + gate.unsqueeze(1) * h, atol=1e-6)


def test_strided_inputs_give_the_values_of_their_contiguous_copies():
    x = torch.randn(4, 6, 16).transpose(0, 1)  # [6, 4, 16], not contiguous
    rows = torch.randn(6, 32)
    shift, scale = rows[:, :16], rows[:, 16:]
    assert not x.is_contiguous() and not shift.is_contiguous()
    assert torch.equal(kernels.norm_modulate(x, shift, scale, 1e-6),
                       kernels.norm_modulate(x.contiguous(), shift.contiguous(), scale.contiguous(), 1e-6))
    weight = torch.randn(40, 16)
    assert torch.equal(kernels.linear_gelu(x, weight, rows[0, :40]), kernels.linear_gelu(x.contiguous(), weight,
                                                                                        rows[0, :40].contiguous()))


def test_other_dtypes_autocast_and_the_opt_out_use_torchs_operations(monkeypatch):
    x, rows, weight = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(5, 8)
    bias = rows[0, :5]
    assert torch.equal(kernels.norm_modulate(x.double(), rows.double(), rows.double(), 1e-6),
                       torch_norm_modulate(x.double(), rows.double(), rows.double()))
    assert torch.equal(kernels.gated_add(x, rows[:1], x), x + rows[:1].unsqueeze(1) * x)  # one gate for all: torch's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.uses_kernel(x)
        assert torch.equal(kernels.linear_gelu(x, weight, bias), torch_linear_gelu(x, weight, bias))
    monkeypatch.setenv(kernels.OPT_OUT, "0")
    kernels.library.cache_clear()
    assert kernels.library() is None and not kernels.uses_kernel(x)
    assert torch.equal(kernels.linear_gelu(x, weight, bias), torch_linear_gelu(x, weight, bias))


def test_a_compiler_that_fails_turns_the_kernels_off_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 at `--version`
    with caplog.at_level(logging.WARNING, logger="ditlab.kernels"):
        assert kernels.library() is None
    assert "CPU kernels are off" in caplog.text
    x, weight, bias = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.equal(kernels.linear_gelu(x, weight, bias), torch_linear_gelu(x, weight, bias))
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.partial"))


def test_the_library_is_built_once_per_cache_and_named_by_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("DITLAB_CACHE_DIR", str(tmp_path))
    first = kernels.build()
    mtime = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == mtime  # taken from the cache
    assert first.parent == tmp_path / "kernels" and first.name.startswith("kernels-")
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left
    monkeypatch.setattr(kernels, "_cpu_identity", lambda: "another CPU")
    assert kernels.build() != first  # a library built for another CPU is never reused


def torch_attention(qkv, num_heads):
    b, n, c3 = qkv.shape
    q, k, v = (t.view(b, n, num_heads, -1).transpose(1, 2) for t in qkv.split(c3 // 3, dim=-1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c3 // 3)


def needs_attention_kernel():
    if not kernels.library().has_attention:
        pytest.skip("the attention kernel needs a CPU with AVX-512")


# (batch, tokens, heads, head size): 48 tokens take both widths of the product's tiles; 256 is the most
# the kernel takes (DiT-S/2 and the other /2 models at 256px).
@pytest.mark.parametrize("shape", [(3, 48, 3, 32), (1, 16, 2, 16), (2, 256, 2, 64)],
                         ids=["48 tokens", "one sample", "256 tokens"])
def test_attention_computes_torchs_function_forward_and_backward(shape, threads):
    needs_attention_kernel()
    b, n, heads, d = shape
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(b, n, 3 * heads * d, generator=g) * 2  # scores of a few units: peaked rows
    grad = torch.randn(b, n, heads * d, generator=g)
    ours, node = values_and_grads(lambda t: kernels.attention(t, heads), [qkv], grad)
    theirs, _ = values_and_grads(lambda t: torch_attention(t, heads), [qkv], grad)
    exact, _ = values_and_grads(lambda t: torch_attention(t, heads), [qkv.double()], grad.double())
    assert node == "_AttentionBackward"
    for which, mine, torchs_value, truth in zip(["value", "grad"], ours, theirs, exact, strict=True):
        ours_error, torchs_error = (mine - truth).abs().max().item(), (torchs_value - truth).abs().max().item()
        assert ours_error <= max(4 * torchs_error, 2e-6), (which, ours_error, torchs_error)


def test_attention_with_saturated_scores_stays_finite_and_as_close_as_torchs():
    needs_attention_kernel()
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 16, 3 * 16, generator=g)
    qkv[..., :32] *= 100  # scores in the thousands: each row's softmax is one key or a near-tie of two
    grad = torch.randn(2, 16, 16, generator=g)
    ours, node = values_and_grads(lambda t: kernels.attention(t, 1), [qkv], grad)
    theirs, _ = values_and_grads(lambda t: torch_attention(t, 1), [qkv], grad)
    exact, _ = values_and_grads(lambda t: torch_attention(t, 1), [qkv.double()], grad.double())
    assert node == "_AttentionBackward"
    for mine, torchs_value, truth in zip(ours, theirs, exact, strict=True):
        assert torch.isfinite(mine).all()
        assert (mine - truth).abs().max() <= max(4 * (torchs_value - truth).abs().max().item(), 2e-6)


def test_attention_spreads_nan_as_torch_does():
    needs_attention_kernel()
    qkv = torch.randn(2, 32, 3 * 32)
    qkv[0, 5, 3] = float("nan")  # a query of sample 0's first head: its row of scores
    qkv[1, 7, 32 + 20] = float("nan")  # a key of sample 1's second head: every score of that head
    qkv[1, 9, 64 + 2] = float("nan")  # a value of sample 1's first head: that channel of every row
    ours = kernels.attention(qkv.requires_grad_(), 2)
    assert type(ours.grad_fn).__name__ == "_AttentionBackward"
    assert torch.equal(ours.isnan(), torch_attention(qkv, 2).isnan())


def test_attention_outside_the_kernels_reach_is_torchs():
    needs_attention_kernel()
    cases = [torch.randn(2, 20, 96),  # 20 tokens: not a multiple of 16
             torch.randn(1, 272, 96),  # more tokens than the kernel keeps in cache
             torch.randn(2, 16, 48),  # heads of 8 channels
             torch.randn(2, 16, 96).double()]
    for qkv in cases:
        assert torch.equal(kernels.attention(qkv, 2), torch_attention(qkv, 2))
    qkv = torch.randn(2, 16, 96, requires_grad=True)
    assert type(kernels.attention(qkv, 2).grad_fn).__name__ == "_AttentionBackward"
    assert type(kernels.attention(qkv, 2, dropout_p=0.1).grad_fn).__name__ != "_AttentionBackward"


def graph_nodes(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that made t."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["biases in the gated adds", "dropout: biases in the layers"])
def test_a_dit_trains_the_same_with_the_kernels_as_with_torchs_operations(dropout):
    from ditlab.models import build_model

    torch.manual_seed(0)
    # 16 tokens of 3 heads of 64 channels: the attention kernel's too, where the CPU has AVX-512
    model = build_model("DiT-Ti/4", input_size=16, in_channels=2, num_classes=3, depth=2, dropout=dropout).train()
    with torch.no_grad():
        for p in model.parameters():  # random weights everywhere: adaLN-Zero starts the gates at zero
            if p.requires_grad:
                p.normal_(std=0.1)
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(4, 2, 16, 16, generator=g), torch.tensor([1, 50, 500, 999]), torch.tensor([0, 1, 2, 3])

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(3)  # the same dropout masks both times
        loss = model(x, t, y).square().mean()
        nodes.append(graph_nodes(loss))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    nodes = []
    assert kernels.uses_kernel(x)
    ours = loss_and_grads()
    with kernels.off():
        assert not kernels.uses_kernel(x)
        theirs = loss_and_grads()
    assert kernels.uses_kernel(x)  # back on after the block
    attention_kernel = dropout == 0 and kernels.library().has_attention
    assert ("_AttentionBackward" in nodes[0]) == attention_kernel and "_AttentionBackward" not in nodes[1]
    assert torch.allclose(ours[0], theirs[0], rtol=1e-5)
    for mine, torchs in zip(ours[1], theirs[1], strict=True):
        assert torch.allclose(mine, torchs, rtol=1e-4, atol=1e-6)
