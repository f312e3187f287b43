"""core.allocator: with freed memory kept, a large block freed and allocated again is not faulted
in again, page by page; glibc's defaults (the control, in its own process) fault every page."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from core.allocator import _glibc, keep_freed_memory, user_tuned_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 64 MiB, above glibc's largest mmap threshold (32 MiB): with the defaults it is mmapped and
# unmapped each time. The second round's faults are what a training step pays at every step.
# Through glibc's malloc itself, as torch's CPU allocator does (numpy's large arrays would ask
# for transparent huge pages, which fault 512 times less often and hide the difference).
PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from core.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 2**20
    for _ in range(2):  # malloc, write every page (as a tensor's kernel does), free
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(applied, after - before)
""")


def _probe(mode: str) -> tuple[bool, int]:
    # glibc's defaults, whatever the environment sets
    env = {k: v for k, v in os.environ.items() if not user_tuned_malloc({k: v}) and k != "LANDMARKS_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env={**env, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_freed_blocks_are_not_faulted_in_again():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    applied, kept = _probe("keep")
    control_applied, control = _probe("default")
    assert applied and not control_applied
    assert control >= 0.9 * pages, (control, pages)  # the defaults: the block is mapped afresh
    assert kept < 0.05 * pages, (kept, pages)


def test_a_users_own_malloc_settings_win(monkeypatch):
    assert user_tuned_malloc({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert user_tuned_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.mmap_max=4"})
    assert not user_tuned_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "MALLOC_ARENA_MAX": "2", "PATH": "/bin"})
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert keep_freed_memory() is False  # theirs stand; nothing is changed
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    monkeypatch.setenv("LANDMARKS_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
