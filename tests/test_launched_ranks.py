"""core.launched_ranks: when rank 0 of a script-launched DDP run fails, the ranks it launched stop
too, instead of holding the caller's pipes open for torch's 30-minute rendezvous timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.launched_ranks import remember, stop_launched_ranks

ROOT = Path(__file__).resolve().parents[1]
LANDMARKS = str(Path(sys.executable).with_name("landmarks"))


def _trainer_with(*procs: subprocess.Popen) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=list(procs))))


def test_stop_kills_the_running_ranks_of_the_trainer_and_of_earlier_trainers():
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    current = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    try:
        remember(_trainer_with(earlier))
        remember(_trainer_with(earlier))  # remembered once
        assert stop_launched_ranks(_trainer_with(current, finished)) == 2  # the finished one is not counted
        assert earlier.returncode == current.returncode == -signal.SIGKILL
        assert stop_launched_ranks() == 0  # forgotten once stopped
        # a trainer without a script launcher (one device, ddp_spawn, torchrun) has nothing to stop
        assert stop_launched_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=None))) == 0
    finally:
        for proc in (earlier, current):
            if proc.poll() is None:
                proc.kill()


def _busy_port():
    """A listening socket whose port the run is told to use: rank 0 cannot bind it (EADDRINUSE),
    which is what losing Lightning's probe-then-bind race looks like, while rank 1 can connect to
    it and waits there."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _run_with_pipes(cmd: list[str], port: int, timeout: float) -> subprocess.CompletedProcess | None:
    """Run like ``subprocess.run(capture_output=True)`` does; None if it is still running after
    ``timeout`` (a rank holds the pipes). Everything it started is killed afterwards."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(port), WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


_FIT_SCRIPT = """
import sys
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel
from callbacks import StopLaunchedRanksOnError

callbacks = [StopLaunchedRanksOnError()] if sys.argv[1] == "with" else []
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
trainer.fit(BoringModel())
"""


@pytest.mark.slow
def test_a_fit_whose_rank_0_fails_stops_its_other_rank_with_the_callback_and_hangs_without(tmp_path):
    script = tmp_path / "fit_ddp.py"
    script.write_text(textwrap.dedent(_FIT_SCRIPT))
    with _busy_port() as sock:
        port = sock.getsockname()[1]
        # control: Lightning alone leaves rank 1 waiting, so the caller's pipes stay open
        assert _run_with_pipes([sys.executable, str(script), "without"], port, timeout=40) is None
        done = _run_with_pipes([sys.executable, str(script), "with"], port, timeout=240)
    assert done is not None, "rank 1 still held the pipes after rank 0 failed"
    assert done.returncode != 0 and "EADDRINUSE" in done.stderr


@pytest.mark.slow
def test_landmarks_index_on_two_ranks_returns_when_rank_0_cannot_bind_its_port(tiny_world, tmp_path):
    cmd = [LANDMARKS, "index", "--manifest", str(tiny_world / "db.csv"), "--nonlandmarks",
           str(tiny_world / "calibration.csv"), "--backbone", "mobilenetv2_100", "--image-size", "32",
           "--accelerator", "cpu", "--out", str(tmp_path / "index"), "--devices", "2", "--strategy", "ddp"]
    with _busy_port() as sock:
        done = _run_with_pipes(cmd, sock.getsockname()[1], timeout=240)
    assert done is not None, "rank 1 still held the pipes after rank 0 failed"
    assert done.returncode != 0 and "EADDRINUSE" in done.stderr
    assert not (tmp_path / "index").exists()
