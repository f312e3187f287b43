"""Test-time callback: the Revisited Oxford / Paris benchmark on the model being tested.

At the end of ``trainer.test`` (and, with ``on_validation: true``, of each validation), the
model embeds the database images and the cropped queries of each configured dataset
(:mod:`datamodules.revisited`), every DDP rank a shard; the embeddings are gathered and
put in list order (:func:`core.embedding.embed_dataset`), rank 0 ranks the database
for every query and computes the protocol (:func:`retrieval.revisited.revisited_metrics`), and
every rank logs the same numbers as ``<stage>/<dataset>/map_medium``, ``.../mp@5_hard`` etc.

YAML (compose with any experiment)::

    trainer:
      callbacks:
        - class_path: callbacks.revisited_evaluation.RevisitedEvaluation
          init_args: {root: data/revisitop, datasets: [roxford5k, rparis6k], image_size: 512}

``landmarks test --config ... --ckpt_path ...`` then reports it next to the recognition metrics.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from core.embedding import embed_dataset
from datamodules.manifest import ManifestError
from datamodules.revisited import RevisitedData, RevisitedImages, load_revisited
from datamodules.transforms import eval_transform
from retrieval.revisited import DEFAULT_KAPPAS, rank_database, revisited_metrics

log = logging.getLogger(__name__)

__all__ = ["RevisitedEvaluation", "embed_revisited"]


def embed_revisited(
    embed, data: RevisitedData, image_size: int, device: torch.device, batch_size: int = 32, num_workers: int = 0,
    progress: bool = False, forward_context=None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(query embeddings, database embeddings)`` in list order.

    ``embed`` maps a ``[B, 3, H, W]`` batch in [0, 1] to unit-norm rows (a LightningModule or an
    :class:`~lightning_modules.embedding_net.EmbeddingNet`); ``forward_context`` as for
    :func:`core.embedding.embed_batch`. Under DDP every rank must call this (a collective: each
    rank embeds a shard, every rank gets all rows; :func:`core.embedding.embed_dataset`).
    """
    transform = eval_transform(image_size)
    out = []
    for split in ("queries", "database"):
        dataset = RevisitedImages(data, split, transform, image_size)
        embeddings, extras = embed_dataset(
            embed, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
            forward_context=forward_context, progress=progress, desc=f"{data.name} {split}",
        )
        bad = np.flatnonzero(np.asarray(extras["valid"]) == 0)
        if bad.size:
            # Found only here: telling a bad JPEG before embedding would take a second decoding pass.
            raise ManifestError(
                f"{data.name}: {bad.size} {split} image(s) could not be decoded, first {dataset.paths[bad[0]]}; "
                f"the protocol needs every image (source {data.source})"
            )
        out.append(embeddings.float().numpy())
    return out[0], out[1]


def score_revisited(query_emb: np.ndarray, database_emb: np.ndarray, data: RevisitedData,
                    kappas: Sequence[int] = DEFAULT_KAPPAS) -> dict[str, float]:
    ranks = rank_database(query_emb, database_emb)
    return revisited_metrics(ranks, data.gnd, kappas, n_database=len(data.imlist))


class RevisitedEvaluation(Callback):
    """mAP (Easy / Medium / Hard) and mP@k on ROxford5k / RParis6k after testing.

    Args:
        root: folder holding the datasets (``<root>/<name>/gnd_<name>.pkl`` + ``jpg/``, or the JSON
            of ``landmarks prepare revisited``); see :func:`datamodules.revisited.load_revisited`.
        datasets: which ones, e.g. ``[roxford5k, rparis6k]``.
        image_size: side of the square network input; default: the data module's ``image_size``.
            (Published ROxford/RParis numbers use the full ~1024-px images; a model trained at
            224 px may do better near its training size, so it is worth trying both.)
        batch_size, num_workers: of the embedding loaders.
        kappas: the ``k`` of mP@k.
        on_validation: also run after every validation (costly: ~11k images per epoch).
    """

    def __init__(
        self,
        root: str,
        datasets: Sequence[str] = ("roxford5k", "rparis6k"),
        image_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        kappas: Sequence[int] = DEFAULT_KAPPAS,
        on_validation: bool = False,
    ):
        super().__init__()
        self.root = root
        self.datasets = tuple(datasets)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.kappas = tuple(int(k) for k in kappas)
        self.on_validation = on_validation
        self._data: dict[str, RevisitedData] = {}
        self.history: list[dict] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Read and check the ground truth and files before any work, on every rank.
        needed = stage == "test" or (self.on_validation and stage in ("fit", "validate"))
        if needed and not self._data:
            self._data = {name: load_revisited(self.root, name) for name in self.datasets}

    def _size(self, trainer: pl.Trainer) -> int:
        if self.image_size is not None:
            return int(self.image_size)
        size = getattr(trainer.datamodule, "hparams", {}).get("image_size")
        if size is None:
            raise ValueError("RevisitedEvaluation: set image_size (the data module has none)")
        return int(size)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        metrics: dict[str, float] = {}
        for name, data in self._data.items():
            queries, database = embed_revisited(
                pl_module, data, self._size(trainer), pl_module.device, self.batch_size, self.num_workers,
                forward_context=trainer.precision_plugin.forward_context,
            )
            outcome: dict = {}
            if trainer.is_global_zero:
                try:
                    outcome["metrics"] = score_revisited(queries, database, data, self.kappas)
                except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                    outcome["error"] = f"{type(err).__name__}: {err}"
            outcome = trainer.strategy.broadcast(outcome, src=0)
            if "error" in outcome:
                raise RuntimeError(f"RevisitedEvaluation failed on rank 0: {outcome['error']}")
            metrics.update({f"{name}/{key}": value for key, value in outcome["metrics"].items()})
        logged = {f"{stage}/{key}": float(value) for key, value in metrics.items() if np.isfinite(value)}
        pl_module.log_dict(logged, sync_dist=False, add_dataloader_idx=False)
        self.history.append({"stage": stage, "epoch": trainer.current_epoch, **metrics})
        for name in self._data:
            log.info(
                "%s: mAP E %.2f M %.2f H %.2f", name,
                *(100 * metrics[f"{name}/map_{s}"] for s in ("easy", "medium", "hard")),
            )

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._run(trainer, pl_module, "val")

    @property
    def last_metrics(self) -> dict | None:
        return self.history[-1] if self.history else None
