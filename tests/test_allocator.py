"""The `ditlab` process keeps the memory it frees (ditlab/allocator.py): blocks freed and allocated
again cost no new page faults, and the user's own malloc settings or the opt-out leave glibc as it is."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ditlab.allocator import OPT_OUT, keep_freed_memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                           reason="glibc's malloc only")

# Prints the minor page faults of the last of six rounds that allocate, touch and free four 20 MB
# blocks with the C library's own malloc, after `console` (the `ditlab` executable's entry) has set
# the process up; `main` is replaced by this measurement. With glibc's defaults every round maps its
# 80 MB afresh (20480 faults of 4 KB): freed, they leave more at the top of the heap than glibc's
# trim threshold (twice its mmap threshold, which it raises to at most 32 MB), and glibc gives that
# back to the kernel.
ROUNDS = textwrap.dedent("""
    import ctypes
    import resource
    import ditlab.cli as cli

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def measure(argv=None):
        for _ in range(6):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            blocks = [libc.malloc(20 << 20) for _ in range(4)]
            for block in blocks:
                libc.memset(block, 1, 20 << 20)
            for block in blocks:
                libc.free(block)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
        return 0

    cli.main = measure
    cli.console()
""")


def faults_of_the_last_round(**env: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@glibc
def test_the_ditlab_command_reuses_freed_blocks_and_the_opt_out_leaves_glibc_as_it_is():
    clean = {k: None for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}
    kept = faults_of_the_last_round(**clean, **{OPT_OUT: "1"})
    system = faults_of_the_last_round(**clean, **{OPT_OUT: "0"})
    assert kept < 1000, f"{kept} page faults for blocks freed and allocated again"
    assert system > 15000, f"glibc's defaults took only {system} page faults for 80 MB of blocks"


def test_the_users_own_malloc_settings_and_the_opt_out_are_left_alone():
    # Each returns before touching malloc, so this process is not changed by the test.
    assert keep_freed_memory({OPT_OUT: "0"}) is False
    assert keep_freed_memory({OPT_OUT: "off"}) is False
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is False
    assert keep_freed_memory({"MALLOC_ARENA_MAX": "2"}) is False
