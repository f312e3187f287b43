"""Fewer threads born next to a ``fork()``: tqdm's monitor thread is switched off.

Python 3.11 up to 3.11.7 (this project's CI interpreter) has a bug, CPython gh-112275: a child
made by ``os.fork()`` can deadlock in ``PyOS_AfterFork_Child`` on the interpreter's HEAD lock
when another thread of the parent was creating or deleting its thread state at the moment of the
fork. Data-loader workers are forked, and tqdm starts a monitor thread (``TMonitor``) with every
first progress bar of a class, even a disabled one, so a rank that opens Lightning's predict bar
and then forks its loader's workers races exactly that. Seen as ``landmarks index --devices 2
--strategy ddp`` hanging in about one run in 15-50 on a loaded 2-core machine, and once in CI:
one worker of rank 1 stuck in ``_PyThreadState_DeleteExcept``, rank 1 waiting for its batch,
rank 0 in the next barrier until torch's 30-minute timeout.

This removes one source of such threads everywhere; a DDP rank, which has more of them, starts
its embedding loader's workers from a fork server instead (``retrieval.embed._worker_start``).
The monitor only re-tunes ``miniters`` of bars that stall; tqdm documents ``monitor_interval = 0``
as the way to turn it off. Set on ``tqdm.std.tqdm``, it holds for every subclass (Lightning's bar,
``tqdm.auto``) that does not set its own.
"""

from __future__ import annotations


def no_progress_bar_thread() -> None:
    """Stop tqdm from starting its monitor thread (see the module docstring); idempotent."""
    import tqdm.std

    tqdm.std.tqdm.monitor_interval = 0
