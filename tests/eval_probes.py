"""A callback that tests load by ``class_path`` into real ``landmarks validate`` processes.

It records, per rank, the dataset indices of the rows that the model's ``validation_step`` handed
to the evaluation callback (``outputs["index"]`` next to ``outputs["embeddings"]``, exactly what
``RetrievalEvaluation`` feeds its accumulators), so a DDP test can check each rank's share.
"""

from __future__ import annotations

import json
from pathlib import Path

from pytorch_lightning.callbacks import Callback


class EvalShardRecorder(Callback):
    """Writes ``<out_dir>/<fn>_rank<r>.json``: world size, and per evaluation set its size and the
    indices this rank embedded (in order, padding duplicates included)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self._indices: dict[int, list[int]] = {}

    def on_validation_epoch_start(self, trainer, pl_module):
        self._indices = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        assert len(outputs["embeddings"]) == len(outputs["index"])
        self._indices.setdefault(dataloader_idx, []).extend(int(i) for i in outputs["index"])

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "sets": {
                name: {"size": len(datamodule.eval_dataset(name)), "indices": self._indices.get(i, [])}
                for i, name in enumerate(datamodule.eval_set_names)
            },
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        target = self.out_dir / f"{trainer.state.fn.value}_rank{trainer.global_rank}.json"
        target.write_text(json.dumps(record))
