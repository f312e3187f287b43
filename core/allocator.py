"""Freed memory stays in the process: glibc stops handing large blocks back to the kernel.

glibc serves an allocation above its mmap threshold (at most 32 MiB on 64-bit) with a fresh
``mmap`` and unmaps it on ``free``; it also trims the top of the heap whenever 128 KiB or more
sit free there. A CPU training step allocates and frees activations of tens of megabytes (a batch
of 80 MobileNetV2 images at 96 px: 80 × 96 × 48 × 48 floats is 68 MiB for one tensor), so every
step the kernel maps and zero-fills those pages again, one page fault per 4 KiB. Measured on the
2-core machine, one epoch of the demo's fit and one evaluation (``bench/bench_allocator.py``,
medians of 3 alternating pairs): 18.4 million minor page faults and 42 s of system time with
glibc's defaults; 1.0 million and 4 s with mmap off and no trimming, and the wall time 0.67×
(BENCHMARKS.md, "Page faults: freed memory kept in the process"). The arithmetic is unchanged,
so every figure is the same to the last digit.

The possible price is memory: the process keeps its peak heap until it exits instead of
shrinking after a peak (the demo's peaks: 3.2–4.1 GiB either way, no consistent change measured).
``landmarks`` (``cli.main``) switches this on at start; a library user who imports the
project's packages keeps the allocator as they found it. Skipped where the C library is not glibc,
and where the user has tuned these parameters already (``MALLOC_MMAP_MAX_``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or ``GLIBC_TUNABLES``
naming a ``glibc.malloc.`` tunable): theirs win. ``LANDMARKS_KEEP_FREED_MEMORY=0`` leaves glibc's
defaults. Setting one of those variables is not the same: any of them also switches off glibc's
dynamic mmap threshold. With ``MALLOC_MMAP_MAX_=65536``, its default value, the demo's warm-up
fit ran 0.55 steps/s against about 1.4.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest trim threshold mallopt takes (it is stored as an int): the heap's top is never trimmed.
_NEVER_TRIM = 2**31 - 1


# glibc's environment variables for the same parameters (and the two next to them).
_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_tuned_malloc(environ=None) -> bool:
    """Whether the environment already sets glibc's mmap or trimming parameters."""
    environ = os.environ if environ is None else environ
    return any(k in environ for k in _MALLOC_VARIABLES) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a GNU system
        return False


def keep_freed_memory() -> bool:
    """No mmap for large blocks and no heap trimming (see the module docstring). Returns whether the
    settings were applied: False off glibc, where the environment tunes malloc itself, or with
    ``LANDMARKS_KEEP_FREED_MEMORY=0``."""
    if os.environ.get("LANDMARKS_KEEP_FREED_MEMORY", "1") == "0" or not _glibc() or user_tuned_malloc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Trimming off first: with mmap off, big blocks live on the heap.
    return bool(mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM)) and bool(mallopt(M_MMAP_MAX, 0))
