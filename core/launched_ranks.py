"""Rank 0 of a script-launched DDP run takes the ranks it launched down with it when it fails.

Lightning's subprocess launcher (``strategy="ddp"`` without torchrun or SLURM) starts ranks
1..N-1 as child processes of rank 0. When rank 0 raises, Lightning re-raises without stopping
them (it does so only for Ctrl-C), and they wait in the rendezvous or the next collective for
torch's 30-minute timeout, holding the caller's stdout and stderr open: a ``subprocess.run``
with pipes, a CI job or a shell pipeline hangs that long. The most common way for rank 0 alone
to fail is its rendezvous port: Lightning probes a free port, closes it and binds it again a
moment later, and another socket can take it in between (``EADDRINUSE``).

No Lightning import: :func:`remember` and :func:`stop_launched_ranks` read
``trainer.strategy.launcher.procs`` (the launcher's list of ``subprocess.Popen``) by duck typing,
so this layer stays importable on its own. The Lightning glue is
``callbacks.launched_ranks.StopLaunchedRanksOnError``; ``retrieval.embed`` and the command line
call these functions directly.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from typing import Any

log = logging.getLogger(__name__)

#: Ranks launched by this process, remembered across Trainers: a second Trainer in rank 0 joins
#: the process group of the first and has no children of its own to stop.
_LAUNCHED: list[subprocess.Popen] = []


def _children(trainer: Any) -> list[subprocess.Popen]:
    strategy = getattr(trainer, "strategy", None)
    procs = getattr(getattr(strategy, "launcher", None), "procs", None)
    return [p for p in procs or () if isinstance(p, subprocess.Popen)]


def remember(trainer: Any) -> None:
    """Record the child ranks ``trainer``'s launcher started (none outside rank 0 of a
    script-launched run), so a failure after its fit or predict still stops them."""
    for proc in _children(trainer):
        if all(proc is not known for known in _LAUNCHED):
            _LAUNCHED.append(proc)


def stop_launched_ranks(trainer: Any = None) -> int:
    """Kill (SIGKILL) every child rank still running that ``trainer``'s launcher or an earlier
    :func:`remember` recorded, and return how many were running. Rank 0 has failed, so the run is
    lost either way; SIGKILL because a rank blocked inside the C++ rendezvous does not run a
    Python SIGTERM handler until it times out."""
    remember(trainer)
    running = [proc for proc in _LAUNCHED if proc.poll() is None]
    for proc in running:
        log.debug("stopping launched rank (pid %d) after rank 0 failed", proc.pid)
        proc.send_signal(signal.SIGKILL)
    for proc in running:
        proc.wait()
    _LAUNCHED.clear()
    return len(running)
