"""LandmarkCLI with ``--ckpt_path``: the checkpoint fills in only the model arguments the user did not give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli.lightning_cli import LandmarkCLI
from lightning_modules.landmark_module import CHECKPOINT_FORMAT

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(path: Path, **hparams) -> Path:
    """A checkpoint as LightningCLI reads it for ``--ckpt_path``: only its hyperparameters matter here."""
    base = {"backbone": "resnet18", "pretrained": False, "pooling": "gem", "embedding_size": 32,
            "eval_scales": [1.25], "warmup_steps": 7, "num_classes": 4, "_instantiator": "pytorch_lightning.cli.instantiate_module"}
    torch.save({"hyper_parameters": {**base, **hparams}, "state_dict": {},
                "landmark_recognition": {"format": CHECKPOINT_FORMAT}}, path)
    return path


def _model_of(args: list[str], monkeypatch) -> object:
    """The LandmarkModule LandmarkCLI builds for ``args``, without running the subcommand."""
    built = {}
    monkeypatch.setattr(LandmarkCLI, "_run_subcommand", lambda self, subcommand: built.update(model=self.model))
    LandmarkCLI(args=args)
    return built["model"]


def _validate_args(world: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["validate", "--config", str(ROOT / "experiments" / "demo.yaml"), f"--data.data_dir={world}",
            "--data.image_size=32", "--data.num_workers=0", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--model.pretrained=false", "--model.backbone=resnet18",
            *extra, f"--ckpt_path={ckpt}"]


def test_a_value_given_on_the_command_line_wins_over_the_checkpoints(tiny_world, tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "model.ckpt")
    model = _model_of(_validate_args(tiny_world, ckpt, "--model.eval_scales=[1.414]"), monkeypatch)
    # Lightning alone would evaluate at the checkpoint's 1.25 and report it as 1.414's numbers.
    assert model.eval_scales == (1.414,)


def test_the_checkpoint_fills_in_what_the_user_did_not_give(tiny_world, tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "model.ckpt")
    model = _model_of(_validate_args(tiny_world, ckpt), monkeypatch)
    # demo.yaml sets neither eval_scales nor warmup_steps: both come from the checkpoint.
    assert model.eval_scales == (1.25,)
    assert model.hparams.warmup_steps == 7


def test_a_value_from_a_config_file_wins_over_the_checkpoints(tiny_world, tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path / "model.ckpt")
    extra = tmp_path / "scales.yaml"
    extra.write_text("model:\n  eval_scales: [1.0, 1.414]\n")
    model = _model_of(_validate_args(tiny_world, ckpt, "--config", str(extra)), monkeypatch)
    assert model.eval_scales == (1.0, 1.414)
    assert model.hparams.warmup_steps == 7  # not given by the user: the checkpoint's


@pytest.mark.parametrize("value", ["[1.414]", "null"])
def test_without_a_checkpoint_nothing_changes(tiny_world, tmp_path, monkeypatch, value):
    args = [a for a in _validate_args(tiny_world, tmp_path / "missing.ckpt", f"--model.eval_scales={value}")
            if not a.startswith("--ckpt_path")]
    model = _model_of(args, monkeypatch)
    assert model.eval_scales == ((1.414,) if value != "null" else None)
