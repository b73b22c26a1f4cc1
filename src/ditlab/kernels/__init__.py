"""CPU kernels for DiT's blocks that torch runs in several passes, compiled on this machine the first
time a process needs them.

- `linear_gelu`: a linear layer and GELU in its tanh form (DiT's first MLP layer, and diffusers').
  torch's kernel for the tanh form calls a vectorised tanh that is slow on x86 CPUs: at DiT-S/4's
  MLP activations on 2 threads its GELU took 2.7 ms forward and 2.9 ms backward, this kernel 0.9
  and 1.1 ms with the bias added in the same pass (BENCHMARKS.md, "Kernels of our own"). torch's
  addmm copies the bias into its output before the product; here the product runs without it, and
  the backward sums the bias's gradient in GELU's pass.
- `norm_modulate`: adaLN's LayerNorm (no affine weights) and modulation, `x_hat * (1 + scale) +
  shift`, in one pass forward and one backward, where torch takes a LayerNorm, a multiply and an
  add each way plus the sums for scale's and shift's gradients.
- `gated_add`: adaLN-Zero's gated residual `x + gate * (h + bias)`, likewise, with the bias of the
  linear layer that made h.
- `attention`: multi-head self-attention from the fused qkv projection's output, on CPUs with
  AVX-512, with matrix products of its own (register-tiled, one sample-head's N x N scores in cache).
  torch's path (its flash-attention kernel, then autograd's concatenation of the three gradients)
  took 1.25x as long forward and backward at DiT-S/2's 256 tokens, 1.5x at DiT-S/4's 64 and 1.9x
  at the quickstart's 16; this one reads q, k and v where the projection wrote them and writes
  qkv's gradient whole.

The source, `kernels.c`, is plain arithmetic the compiler vectorises, and AVX-512 intrinsics for
attention's products; the values differ from torch's by float rounding (tests/test_kernels.py
bounds it).

How it is built: the C compiler (`$CC`, else `cc`) compiles the source for this CPU
(`-march=native`, OpenMP for the threads torch is set to use) into a shared library under
`$DITLAB_CACHE_DIR/kernels` (default `~/.cache/ditlab/kernels`), named by a digest of the source,
the flags, the compiler's version and this CPU's model and instruction sets, so a cache shared by
different machines never hands one a library built for another. Compiling takes about half a
second; processes that start together (Ray Train's workers) each write a temporary file and rename
it into place. The library links the OpenMP runtime torch has already loaded (libgomp), so it
shares torch's threads rather than starting its own.

Where they do not apply, each function is torch's own operations: tensors on a GPU, dtypes other
than float32, under autocast (the bf16 switch), inside `torch.compile` (which fuses these itself),
with no C compiler or if compiling fails (logged once), and when DITLAB_CPU_KERNELS is 0.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

OPT_OUT = "DITLAB_CPU_KERNELS"
SOURCE = Path(__file__).with_name("kernels.c")


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.insert(2, "-mprefer-vector-width=512")  # gcc picks 256-bit vectors on AVX-512 CPUs unless told
    return flags


def _cpu_identity() -> str:
    """This CPU's model and instruction sets as the kernel sees them (Linux), else the platform's word."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))  # one line of each kind: the cores are alike


def cache_dir() -> Path:
    return Path(os.environ.get("DITLAB_CACHE_DIR", Path.home() / ".cache" / "ditlab")) / "kernels"


def build(compiler: str | None = None) -> Path:
    """The compiled library's path, compiling it first if the cache does not hold it. Raises
    OSError or subprocess.CalledProcessError when there is no compiler or it fails."""
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler found (set CC, or install gcc)")
    command = shlex.split(compiler)  # CC may carry flags of its own
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, check=True).stdout
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(b"\0".join([source, " ".join(command + _flags()).encode(), version.encode(),
                                        _cpu_identity().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{SOURCE.stem}-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    try:
        subprocess.run([*command, *_flags(), str(SOURCE), "-o", partial, "-lm"], capture_output=True, text=True,
                       check=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they do not apply (module docstring)."""
    if os.environ.get(OPT_OUT, "1").strip() == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1:] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        log.warning("ditlab's CPU kernels are off (torch's operations are used instead): %s", detail)
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "ditlab_bias_gelu_forward": [p, p, p, i64, i64, i32],
        "ditlab_bias_gelu_backward": [p, p, p, p, i64, i64, i32],
        "ditlab_norm_modulate_forward": [p, p, p, p, p, p, i64, i64, i64, f32, i32],
        "ditlab_norm_modulate_backward": [p, p, p, p, p, p, p, p, i64, i64, i64, i32],
        "ditlab_gated_add_forward": [p, p, p, p, p, i64, i64, i64, i32],
        "ditlab_gated_add_backward": [p, p, p, p, p, p, p, i64, i64, i64, i32],
    }
    lib.ditlab_attention_available.argtypes, lib.ditlab_attention_available.restype = [], ctypes.c_int
    lib.has_attention = bool(lib.ditlab_attention_available())
    if lib.has_attention:  # compiled for a CPU with AVX-512
        signatures.update({"ditlab_attention_forward": [p, p, p, i64, i64, i64, i64, i32],
                           "ditlab_attention_backward": [p, p, p, p, p, i64, i64, i64, i64, i32]})
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib



@contextmanager
def off() -> Iterator[None]:
    """torch's operations inside, whatever this machine has: what the benchmarks and tests compare
    the kernels with."""
    global library
    loaded, library = library, lambda: None
    try:
        yield
    finally:
        library = loaded

class _LinearGelu(torch.autograd.Function):
    """gelu(x @ weight.T + bias): torch's product, then the bias and GELU in one pass; the backward
    takes GELU's gradient and the bias's in one pass, then the two products a linear layer's
    backward takes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        a = rows.mm(weight.t())  # the product alone: the kernel adds the bias, where addmm would copy it in first
        y, bias = torch.empty_like(a), bias.contiguous()
        library().ditlab_bias_gelu_forward(a.data_ptr(), bias.data_ptr(), y.data_ptr(), a.shape[0], a.shape[1],
                                           torch.get_num_threads())
        ctx.save_for_backward(rows, weight, a)
        ctx.input_shape = x.shape
        return y.view(*x.shape[:-1], a.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rows, weight, a = ctx.saved_tensors
        grad = grad.reshape(a.shape).contiguous()
        threads = torch.get_num_threads()
        grad_a, partials = torch.empty_like(a), a.new_zeros(threads, a.shape[1])
        library().ditlab_bias_gelu_backward(grad.data_ptr(), a.data_ptr(), grad_a.data_ptr(), partials.data_ptr(),
                                            a.shape[0], a.shape[1], threads)
        need_x, need_weight, need_bias = ctx.needs_input_grad
        return (grad_a.mm(weight).view(ctx.input_shape) if need_x else None,
                grad_a.t().mm(rows) if need_weight else None,
                partials.sum(0) if need_bias else None)


class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
        b, n, c = x.shape
        y, mean, rstd = torch.empty_like(x), x.new_empty(b, n), x.new_empty(b, n)
        library().ditlab_norm_modulate_forward(x.data_ptr(), shift.data_ptr(), scale.data_ptr(), y.data_ptr(),
                                               mean.data_ptr(), rstd.data_ptr(), b, n, c, eps,
                                               torch.get_num_threads())
        ctx.save_for_backward(x, scale, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, scale, mean, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        b, n, c = x.shape
        grad_x, grad_shift, grad_scale = torch.empty_like(x), x.new_empty(b, c), x.new_empty(b, c)
        library().ditlab_norm_modulate_backward(grad.data_ptr(), x.data_ptr(), scale.data_ptr(), mean.data_ptr(),
                                                rstd.data_ptr(), grad_x.data_ptr(), grad_shift.data_ptr(),
                                                grad_scale.data_ptr(), b, n, c, torch.get_num_threads())
        return grad_x, grad_shift, grad_scale, None


class _GatedAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x, gate, h, bias = x.contiguous(), gate.contiguous(), h.contiguous(), bias.contiguous()
        b, n, c = x.shape
        y = torch.empty_like(x)
        library().ditlab_gated_add_forward(x.data_ptr(), gate.data_ptr(), h.data_ptr(), bias.data_ptr(),
                                           y.data_ptr(), b, n, c, torch.get_num_threads())
        ctx.save_for_backward(gate, h, bias)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, h, bias = ctx.saved_tensors
        grad = grad.contiguous()
        b, n, c = h.shape
        threads = torch.get_num_threads()
        grad_h, grad_gate, partials = torch.empty_like(h), h.new_empty(b, c), h.new_zeros(threads, c)
        library().ditlab_gated_add_backward(grad.data_ptr(), gate.data_ptr(), h.data_ptr(), bias.data_ptr(),
                                            grad_h.data_ptr(), grad_gate.data_ptr(), partials.data_ptr(), b, n, c,
                                            threads)
        return grad, grad_gate, grad_h, partials.sum(0)


class _Attention(torch.autograd.Function):
    """Multi-head self-attention from qkv [B, N, 3C] to [B, N, C]; the backward returns qkv's gradient
    as one tensor."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        qkv = qkv.contiguous()
        b, n, c3 = qkv.shape
        out, stats = qkv.new_empty(b, n, c3 // 3), qkv.new_empty(b, num_heads, n, 2)  # each row's max, 1 / sum
        library().ditlab_attention_forward(qkv.data_ptr(), out.data_ptr(), stats.data_ptr(), b, n, num_heads,
                                           c3 // 3 // num_heads, torch.get_num_threads())
        ctx.save_for_backward(qkv, out, stats)
        ctx.num_heads = num_heads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        qkv, out, stats = ctx.saved_tensors
        grad, grad_qkv = grad.contiguous(), torch.empty_like(qkv)
        b, n, c3 = qkv.shape
        library().ditlab_attention_backward(grad.data_ptr(), qkv.data_ptr(), out.data_ptr(), stats.data_ptr(),
                                            grad_qkv.data_ptr(), b, n, ctx.num_heads, c3 // 3 // ctx.num_heads,
                                            torch.get_num_threads())
        return grad_qkv, None


def uses_kernel(*tensors: torch.Tensor) -> bool:
    """Whether these tensors go to the compiled kernels rather than torch's operations."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and library() is not None)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU (tanh form) of a linear layer's output: `F.gelu(F.linear(x, weight, bias), approximate="tanh")`."""
    if bias is not None and uses_kernel(x, weight, bias):
        return _LinearGelu.apply(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm without affine weights over x's last axis, then `* (1 + scale) + shift`, with
    shift and scale one row per sample (x [B, N, C], shift and scale [B, C])."""
    b, _, c = x.shape
    if shift.shape == scale.shape == (b, c) and uses_kernel(x, shift, scale):
        return _NormModulate.apply(x, shift, scale, eps)
    return F.layer_norm(x, (c,), eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_add(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """adaLN-Zero's gated residual `x + gate * (h + bias)`, with the gate one row per sample (x and h
    [B, N, C], gate [B, C]) and `bias` that of the linear layer that made h, if it has not added it."""
    b, _, c = x.shape
    shapes_fit = h.shape == x.shape and gate.shape == (b, c) and (bias is None or bias.shape == (c,))
    if shapes_fit and uses_kernel(x, gate, h, *([] if bias is None else [bias])):
        return _GatedAdd.apply(x, gate, h, h.new_zeros(c) if bias is None else bias)
    return x + gate.unsqueeze(1) * (h if bias is None else h + bias)


# The most tokens the attention kernel takes: one sample-head's N x N scores (and, in the backward,
# their gradient) are kept whole per thread, 256 KB each at 256 tokens (the /2 DiTs at 256px).
ATTENTION_MAX_TOKENS = 256


def attention(qkv: torch.Tensor, num_heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head self-attention, `softmax(Q K^T / sqrt(d)) V` per head, from a fused projection's
    output qkv [B, N, 3C] (q, k and v side by side, each `num_heads` heads of d channels) to
    [B, N, C] (the heads side by side). The kernel takes N and d multiples of 16, N up to
    ATTENTION_MAX_TOKENS, and no dropout; elsewhere it is torch's attention
    (`ditlab.models.attention.scaled_dot_product_attention`)."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // num_heads
    if (dropout_p == 0 and n % 16 == 0 and d % 16 == 0 and n <= ATTENTION_MAX_TOKENS and uses_kernel(qkv)
            and library().has_attention):
        return _Attention.apply(qkv, num_heads)
    from ditlab.models.attention import scaled_dot_product_attention  # here: ditlab.models imports this module

    # Split on the last axis, then view each part as heads: the same numbers as permuting a
    # [b, n, 3, heads, d] view, with the strides torch's kernel prefers (15% less time for the
    # attention sub-layer at DiT-S/2 on CPU; BENCHMARKS.md).
    q, k, v = (t.view(b, n, num_heads, d).transpose(1, 2) for t in qkv.split(c, dim=-1))
    return scaled_dot_product_attention(q, k, v, dropout_p=dropout_p).transpose(1, 2).reshape(b, n, c)
