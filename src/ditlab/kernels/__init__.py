"""CPU kernels that torch runs slowly, compiled on this machine the first time a process needs them.

One so far: GELU in its tanh form (DiT's MLP activation, and diffusers'), forward and backward, for
float32 tensors on the CPU. torch's kernel for it calls a vectorised tanh that is slow on x86 CPUs:
on the 2-core Xeon the MLP activations of the quickstart's model took 1.3 ms forward and 1.4 ms
backward in torch, 0.28 and 0.43 ms in this kernel (BENCHMARKS.md, "GELU as a compiled kernel").
The source, `gelu_tanh.c`, computes the same function in plain arithmetic the compiler vectorises;
its values differ from torch's by float rounding (at most about 5e-7 at the activations' scale).

How it is built: the C compiler (`$CC`, else `cc`) compiles the source for this CPU
(`-march=native`, OpenMP for the threads torch is set to use) into a shared library under
`$DITLAB_CACHE_DIR/kernels` (default `~/.cache/ditlab/kernels`), named by a digest of the source,
the flags, the compiler's version and this CPU's model and instruction sets, so a cache shared by
different machines never hands one a library built for another. Compiling takes well under a
second; processes that start together (Ray Train's workers) each write a temporary file and rename
it into place. The library links the same OpenMP runtime torch has already loaded (libgomp), so
it shares torch's threads rather than starting its own.

Where it does not apply, `gelu_tanh` is torch's `F.gelu(x, approximate="tanh")`: tensors on a GPU
(torch's CUDA kernel is fast), dtypes other than float32 (bf16 autocast), inside `torch.compile`
(which fuses the activation itself), with no C compiler or if compiling fails (logged once), and
when DITLAB_CPU_KERNELS is 0.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

OPT_OUT = "DITLAB_CPU_KERNELS"
SOURCE = Path(__file__).with_name("gelu_tanh.c")


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
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(b"\0".join([source, " ".join(_flags()).encode(), version.encode(),
                                        _cpu_identity().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{SOURCE.stem}-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *_flags(), str(SOURCE), "-o", partial], capture_output=True, text=True, check=True)
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
        log.warning("ditlab's CPU kernels are off (torch's GELU is used instead): %s", detail)
        return None
    for name in ("ditlab_gelu_tanh_forward", "ditlab_gelu_tanh_backward"):
        fn = getattr(lib, name)
        fn.restype = None
    lib.ditlab_gelu_tanh_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.ditlab_gelu_tanh_backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int]
    return lib


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        library().ditlab_gelu_tanh_forward(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        library().ditlab_gelu_tanh_backward(grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), x.numel(),
                                            torch.get_num_threads())
        return grad_x


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether `gelu_tanh(x)` runs the compiled kernel rather than torch's."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
            and library() is not None)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh form: `F.gelu(x, approximate="tanh")`, by the compiled kernel where it applies."""
    return _GeluTanh.apply(x) if uses_kernel(x) else F.gelu(x, approximate="tanh")
