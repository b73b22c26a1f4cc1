"""What every benchmark here shares: the machine's measured matmul peak, FLOP counts that include
attention, medians of repeated timings, and a table printed with the command that produced it.

Figures are judged against the peak measured in the same run (a large fp32 matmul on the threads
the benchmark uses), never against a number from another day: these machines are shared and noisy.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

# The quickstart's spec with the model issue 14's figures are defined at: DiT-Ti/4 as the preset has
# it, 6 blocks. The quickstart itself trains 4 blocks since 2 December (experiments/quickstart.yaml);
# the benchmarks that time "the quickstart model" keep 6, so their figures compare across days.
ISSUE_14_MODEL = "model.depth=6"


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# On CPU, scaled_dot_product_attention runs as `_scaled_dot_product_flash_attention_for_cpu`, which
# torch's FlopCounterMode has no formula for: without these two it leaves out QK^T and AV
# (and their gradients). The formulas are torch's own for the GPU kernels of the same maths.
SDPA_ON_CPU = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (a multiply-add counts 2) of running `fn` once, attention included. Counted with
    ditlab's CPU kernels off: FlopCounterMode sees torch's operations only, and the attention kernel
    does its products inside (the same products, so the same count)."""
    from ditlab import kernels

    with kernels.off(), FlopCounterMode(display=False, custom_mapping=SDPA_ON_CPU) as counter:
        fn()
    return counter.get_total_flops()


def time_median(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls of `fn`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def steady_images_per_sec(history: list[dict]) -> float | None:
    """The training loop's steady images/s (the global batch's: all workers together): the median of
    its log windows after the first (warm-up). None for a run with fewer than two windows."""
    rates = [h["images_per_sec"] for h in history if "images_per_sec" in h][1:]
    return statistics.median(rates) if rates else None


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large fp32 matmul on the current torch threads: the physical limit the other
    figures are a share of."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = time_median(lambda: a @ b, repeats, warmup=2)
    return 2 * size**3 / seconds / 1e9


def header(title: str) -> str:
    """The table's first lines: what, the command, the machine and the date."""
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"# {title}\n# command: python {command}\n# machine: {os.cpu_count()} CPUs ({cpu}), {gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
            f"# date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")


def table(rows: list[dict], columns: list[str]) -> str:
    """Rows as an aligned plain-text table (floats to 4 significant figures)."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
