"""Shared fixtures: a tiny synthetic world, generated once per test session."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")  # tests never talk to a server
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from datamodules.synth import SynthConfig, generate_world

    out = tmp_path_factory.mktemp("worlds") / "tiny"
    generate_world(out, SynthConfig.tiny(seed=0), workers=1, progress=False)
    return out


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """In-process fits leave their wandb run open, and a later WandbLogger would silently reuse it
    (Lightning attaches to ``wandb.run`` when one exists): close it after every test."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: on a busy 2-core CI machine torch's spinning
    OpenMP threads made a 4-image forward pass take seconds instead of ~50 ms (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
