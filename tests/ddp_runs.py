"""Running a command that launches DDP ranks from a test, without hanging and without flaking.

* The output goes to files, not pipes, and the command runs in its own process group, which is
  killed afterwards: a rank left behind by a failed rank 0 can neither block the test on an open
  pipe nor outlive it.
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

PORT_RACE = "EADDRINUSE"


def _run_once(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True, **kwargs)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # any rank still running
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def run_ranks(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` for a
    command that launches DDP ranks (see the module docstring)."""
    done = _run_once(cmd, timeout, **kwargs)
    if done.returncode != 0 and PORT_RACE in done.stderr:
        done = _run_once(cmd, timeout, **kwargs)
    return done
