"""Keep the memory a process frees for its next allocations (glibc's malloc, on Linux).

By default glibc hands a block larger than its mmap threshold (128 KB at first, raised to the size
of such a block when one is freed, at most 32 MB) to the kernel as a fresh mapping, and returns the
top of its heap to the kernel whenever more than twice that threshold of it is free. A network's
activations are such blocks, allocated and freed at every step or batch: each time the kernel maps
their memory again, the process takes a page fault for every 4 KB it first touches, and the kernel
zeroes the page. `ditlab evaluate` of the quickstart's checkpoint took 3.0 million page faults that
way, and 0.8 million with this; it ran 1.16x as fast, for 5% more peak memory (BENCHMARKS.md,
"Freed memory kept").

`keep_freed_memory()` sets two of glibc's `mallopt` parameters: the mmap threshold at its ceiling,
32 MB (blocks up to that size come from the heap, where freed blocks are reused; larger ones still
go back to the kernel when freed), and no trimming of the heap. What it costs: the process keeps
what it has freed of its heap until it exits, so its peak resident memory can rise. The `ditlab`
command calls it once at start. It does nothing on a C library other than glibc, when the
environment already sets malloc's parameters (`GLIBC_TUNABLES`, `MALLOC_*_`), or when
DITLAB_KEEP_FREED_MEMORY is 0. An allocator preloaded in glibc's place (jemalloc, tcmalloc) does
not read these parameters.

Ray Train's workers are processes Ray starts, and this does not reach them: in scratch timings of
the quickstart's step in a thread, as Ray Train runs it, glibc's settings made no difference
beyond the noise (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import os

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc refuses more (half its 64 MB heap size)

OPT_OUT = "DITLAB_KEEP_FREED_MEMORY"


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Set glibc's malloc to keep freed memory (module docstring). True if it did."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if "malloc" in env.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in env):
        return False  # the user's own settings
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # not glibc (macOS, musl) or no such name
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 as the trim threshold is glibc's "never trim" (mallopt(3)); mallopt returns 1 on success.
    return mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
