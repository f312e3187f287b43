"""tests/ddp_runs.py: a command that hangs fails the test with the stack of every process it started."""

from __future__ import annotations

import sys
import textwrap

import pytest
from ddp_runs import RanksHung, run_ranks

# A parent that waits forever on a child that sleeps forever: two processes, both stuck (the parent
# gets there only once the child says it is in its function).
_HANG = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\\ndef stuck_child():\\n print('in', flush=True)\\n time.sleep(600)\\nstuck_child()"], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    def stuck_parent():
        child.wait()
    stuck_parent()
""")


def test_a_hung_command_fails_with_the_stack_of_each_process(tmp_path):
    with pytest.raises(RanksHung) as caught:
        run_ranks([sys.executable, "-c", _HANG], timeout=15, cwd=tmp_path)
    message = str(caught.value)
    assert "still running after 15 s" in message
    assert "stuck_parent" in message.split("stacks and output")[1]  # the dumps, not the command line
    assert "stuck_child" in message.split("stacks and output")[1]  # both processes' stacks


def test_a_command_that_finishes_is_returned_as_it_is(tmp_path):
    done = run_ranks([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (3, "out\n")
