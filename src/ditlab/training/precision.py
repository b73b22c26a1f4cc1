"""`train.matmul_precision`: how the training step multiplies fp32 matrices.

`torch.set_float32_matmul_precision` for the length of each step, then the setting before it back:
validation, sample quality and checkpoints run at full precision whatever the spec says. "high" is
TF32 on GPUs (the DiT reference code trains with TF32 on). "medium" also lets oneDNN multiply in
bf16 with fp32 accumulation on CPUs that have bf16 matrix instructions. On a CPU without them it is
"high", as torch defines "medium" where no fast bf16 products exist: there oneDNN would convert
to bf16 without the instructions that make it pay. Attention keeps fp32 products on CPU
(models/attention.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch


@cache
def cpu_has_bf16_products() -> bool:
    """AMX tiles or AVX512-BF16: what oneDNN needs for bf16 matrix products faster than fp32 ones."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def effective_precision(setting: str, device: torch.device) -> str:
    """What torch is told for `setting` on `device`."""
    return "high" if setting == "medium" and device.type == "cpu" and not cpu_has_bf16_products() else setting


@contextmanager
def matmul_precision(setting: str, device: torch.device) -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(effective_precision(setting, device))
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
