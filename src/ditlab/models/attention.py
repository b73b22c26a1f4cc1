"""Scaled dot-product attention that keeps fp32 matrix products on CPU when the step around it
does not.

`train.matmul_precision: medium` (torch.set_float32_matmul_precision) lets oneDNN compute fp32
matrix multiplies as bf16 products with fp32 accumulation on CPUs with bf16 matrix instructions
(AMX, AVX512-BF16), as TF32 does on GPUs. The linear layers gain from it: about 3x for the
quickstart's projections, forward and backward, on this machine's AMX. Torch's CPU flash-attention
kernel does not. It runs many small products per query block, and under that setting its forward
and backward took 16x and 24x as long at the quickstart's shapes (BENCHMARKS.md, "Matrix products
in bf16"). So on CPU, attention computes its forward and backward with fp32 products, whatever the
setting. Elsewhere (CUDA, or fp32 products already) it is `F.scaled_dot_product_attention` as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


@contextmanager
def fp32_products() -> Iterator[None]:
    """oneDNN's fp32 matrix products at full precision inside, the setting before restored after."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def onednn_products() -> str:
    """How oneDNN multiplies fp32 matrices now: "ieee" (fp32 products), "bf16" or "tf32". Its own
    setting, else the generic one it inherits from ("none" at both: fp32)."""
    for setting in (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.fp32_precision):
        if setting != "none":
            return setting
    return "ieee"


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)`, with fp32 products on CPU."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or onednn_products() == "ieee":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _Fp32Attention.apply(q, k, v, attn_mask, dropout_p)
    with fp32_products():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class _Fp32Attention(torch.autograd.Function):
    """Attention whose backward also runs with fp32 products: the backward pass runs after the
    forward has returned, outside any context the forward could set. The forward keeps its own small
    graph from q, k, v to the output (what autograd would keep for the kernel anyway, dropout mask
    included) and differentiates it in the backward, once: the graph is freed there, as autograd
    frees a node's saved tensors."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, dropout_p):
        with fp32_products(), torch.enable_grad():
            inputs = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*inputs, attn_mask=attn_mask, dropout_p=dropout_p)
        ctx.graph = inputs, out
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        inputs, out = ctx.graph
        del ctx.graph
        wanted = [t for t in inputs if t.requires_grad]
        with fp32_products():
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None)
