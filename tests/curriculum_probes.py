"""Callbacks that tests load by ``class_path`` into real ``landmarks fit`` processes.

They observe a run (what each step trained on, what each rank decided) or end it abruptly, so the
curriculum tests can compare an interrupted-and-resumed run with an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


def _curriculum(trainer: pl.Trainer):
    return next(cb for cb in trainer.callbacks if type(cb).__name__ == "Curriculum")


class StepRecorder(Callback):
    """Appends one JSON line per training step: stage, active classes, the batch's items; per rank."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        curriculum = _curriculum(trainer)
        weights = pl_module.loss.class_weight_matrix()
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "stage": curriculum.stage_index,
            "active": curriculum.active,
            "order": curriculum.order,
            "index": batch["index"].tolist(),
            "label": batch["label"].tolist(),
            "weights_sha": None if weights is None else hashlib.sha256(weights.cpu().numpy().tobytes()).hexdigest(),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


class KillAtStep(Callback):
    """SIGKILLs its own process at the start of a given global step (no cleanup, like an OOM kill)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
