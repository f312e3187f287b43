"""Running a command that launches DDP ranks from a test, without hanging and without flaking.

* The output goes to files, not pipes, and the command runs in its own process group, which is
  killed afterwards: a rank left behind by a failed rank 0 can neither block the test on an open
  pipe nor outlive it.
* A run that outlives its timeout is a hang, and a bare ``TimeoutExpired`` would not say where.
  Every process runs with ``PYTHONFAULTHANDLER=1``; on timeout the whole group gets ``SIGABRT``,
  so each rank (and each data-loader worker) prints the Python stack of every thread to the
  shared stderr, and the test fails with that output.
* One retry, only when rank 0 lost Lightning's port race: Lightning probes a free port, closes
  it and binds it again a moment later (``find_free_network_port``), and another socket can take
  it in between; rank 0 then fails with ``EADDRINUSE`` before anything of ours has run. Any
  other failure is returned as it is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

PORT_RACE = "EADDRINUSE"


class RanksHung(AssertionError):
    """The command outlived its timeout; the message holds the stacks its processes printed."""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _wait_for_group(proc: subprocess.Popen, seconds: float) -> None:
    """Until no process of ``proc``'s group is left (reaping ``proc`` itself), or ``seconds``.

    A fixed pause is not enough on a loaded machine: a process not scheduled in time was killed
    before it had printed its stack."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _run_once(cmd: list[str], timeout: float, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True, env=env, **kwargs)
        hung = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
            _signal_group(proc.pid, signal.SIGABRT)  # faulthandler: every thread's stack to stderr
            _wait_for_group(proc, seconds=30)  # each process dumps, then dies of the signal
        finally:
            _signal_group(proc.pid, signal.SIGKILL)  # any rank or worker still running
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if hung:
        raise RanksHung(f"{' '.join(cmd)[:200]} ... still running after {timeout:.0f} s; stacks and output:\n"
                        f"--- stderr (last 20000 chars) ---\n{stderr[-20000:]}\n--- stdout ---\n{stdout[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_ranks(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` for a
    command that launches DDP ranks (see the module docstring); a hang raises :class:`RanksHung`."""
    done = _run_once(cmd, timeout, **kwargs)
    if done.returncode != 0 and PORT_RACE in done.stderr:
        done = _run_once(cmd, timeout, **kwargs)
    return done
