"""How a data loader's worker processes start: from a fork server by default, not forked from the
process that trains.

A forked worker shares its parent's memory copy-on-write. While it lives, every page the parent
writes for the first time is copied, with one page fault per 4 KiB. A training process rewrites
its activations at every step (more than a GiB for the demo's batch of 80 MobileNetV2 images at
96 px). The train loader starts new workers at every epoch, because the epoch's augmentation seed
travels inside the dataset. So a forked loader makes the trainer copy its whole working set again
at every epoch. Measured on the whole demo (8 epochs in one process, 2-core machine, 3 alternating
runs per arm; BENCHMARKS.md "Loader workers from a fork server"): forked, 5.7 min, and 61-70 s of
system time in the trainer; from a fork server, 5.0 min (0.88x) and 7-8 s, with every figure the
same to the digit.

A fork server is a small single-threaded process, started once per process that trains. It imports
torch and the dataset code once (``PRELOAD``); each worker is then a fork of it, not of the trainer.
It also keeps workers away from the trainer's threads: Python up to 3.11.7 (CPython gh-112275) can
deadlock a child forked while another thread starts or ends (``retrieval.embed._worker_start``
gives DDP ranks a fork server for that reason).

The costs:

* The server's imports take about 5 s of one core. :func:`start_worker_server` starts it when a
  fit begins (``LandmarkDataModule.setup("fit")``), so the imports overlap the rest of the fit's
  set-up.
* As with ``spawn``, each worker imports the script that started the process. A script that builds
  loaders with workers must therefore guard its entry point (``if __name__ == "__main__":``). The
  ``landmarks`` command does. ``data.worker_start: fork`` restores forking.

The worker's dataset is a pickled copy made when its loader starts, so a worker sees the same
dataset state (the epoch's augmentation seed) as a forked one, and draws the same augmentations.
"""

from __future__ import annotations

import multiprocessing
from typing import Literal, get_args

WorkerStart = Literal["forkserver", "fork", "spawn"]
WORKER_STARTS = get_args(WorkerStart)
#: What the fork server imports once, so that a worker's start costs a fork and not these imports.
PRELOAD = ("torch", "datamodules.datasets", "datamodules.transforms")


def worker_context(num_workers: int, start: str = "forkserver"):
    """The ``multiprocessing_context`` of a loader with ``num_workers`` workers started by ``start``.

    ``None`` (the platform's default) when there are no workers, and for ``forkserver`` where the
    platform has none (Windows, whose only method is ``spawn``).
    """
    if start not in WORKER_STARTS:
        raise ValueError(f"worker_start must be one of {', '.join(WORKER_STARTS)}; got {start!r}")
    if num_workers == 0 or start not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context(start)
    if start == "forkserver":
        context.set_forkserver_preload(list(PRELOAD))
    return context


def start_worker_server(num_workers: int, start: str = "forkserver") -> None:
    """Start the fork server now, if loaders will use one, so that its imports overlap other work.

    The server's own imports run in the background. The first loader that needs a worker then
    waits only for what is left of them. Idempotent: a running server is reused.
    """
    if worker_context(num_workers, start) is not None and start == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
