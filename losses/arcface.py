"""ArcFace (additive angular margin) and sub-center ArcFace, via pytorch-metric-learning."""

from typing import Literal

import torch
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor

from core.labels import NONLANDMARK
from losses.base import MetricLoss, is_landmark


class _MaskedCosine:
    """Mixin for PML's ArcFace losses: curriculum-inactive classes' cosines are masked out of the softmax."""

    def __init__(self, *args, mask_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self._mask_fn = mask_fn

    def get_cosine(self, embeddings):
        return self._mask_fn(super().get_cosine(embeddings))


class _MaskedArcFace(_MaskedCosine, pml_losses.ArcFaceLoss):
    pass


class _MaskedSubCenterArcFace(_MaskedCosine, pml_losses.SubCenterArcFaceLoss):
    pass


class ArcFaceLoss(MetricLoss):
    """ArcFace (Deng et al. 2019) or, with ``sub_centers > 1``, sub-center ArcFace (Deng et al. 2020).

    Wraps PML's ``ArcFaceLoss`` / ``SubCenterArcFaceLoss``. PML keeps the class weights as one
    parameter ``W`` of shape ``[d, num_outputs * sub_centers]`` (class ``c``'s sub-centers are
    columns ``c*k .. c*k+k-1``); the PML module is a registered submodule, so ``W`` is trained by
    the LightningModule's optimizer, saved in ``state_dict`` (key ``arcface.W``) and synced by DDP.

    Args:
        num_classes: Number of landmark classes.
        embedding_size: Dimension of the embeddings.
        margin: Additive angular margin in DEGREES (PML's convention: it converts with
            ``np.radians``); the default 28.6 degrees is ArcFace's usual m = 0.5 rad.
        scale: Logit scale s applied to the (margin-adjusted) cosines.
        sub_centers: Sub-centers per class; the class cosine is the max over its sub-centers.
            1 gives plain ArcFace.
        nonlandmarks: ``"class"``: non-landmark images form one extra class (index
            ``num_classes``), so the classifier learns to reject them. ``"ignore"``: they are
            dropped from this loss.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64.0,
        sub_centers: int = 1,
        nonlandmarks: Literal["ignore", "class"] = "ignore",
    ) -> None:
        super().__init__(num_classes, embedding_size)
        if sub_centers < 1:
            raise ValueError(f"sub_centers must be >= 1, got {sub_centers}")
        if nonlandmarks not in ("ignore", "class"):
            raise ValueError(f"nonlandmarks must be 'ignore' or 'class', got {nonlandmarks!r}")
        self.sub_centers = sub_centers
        self.nonlandmarks = nonlandmarks
        self.num_outputs = num_classes + (nonlandmarks == "class")
        if sub_centers == 1:
            self.arcface = _MaskedArcFace(
                self.num_outputs, embedding_size, margin=margin, scale=scale, mask_fn=self._mask_inactive
            )
        else:
            # SubCenterArcFaceLoss reads num_classes/embedding_size from kwargs only.
            self.arcface = _MaskedSubCenterArcFace(
                mask_fn=self._mask_inactive,
                num_classes=self.num_outputs,
                embedding_size=embedding_size,
                margin=margin,
                scale=scale,
                sub_centers=sub_centers,
            )

    def _compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        weight = self.arcface.W
        # PML recasts W.data to the embeddings' dtype in place; matching W's dtype keeps the
        # parameter's dtype (and its optimizer state) intact.
        embeddings = embeddings.to(weight.dtype)
        if self.nonlandmarks == "class":
            rows, targets = embeddings, torch.where(labels == NONLANDMARK, self.num_classes, labels)
        else:
            keep = is_landmark(labels)
            rows, targets = embeddings[keep], labels[keep]
        if not targets.numel():
            return self._connected_zero(embeddings)
        return self.arcface(rows, targets)

    def _class_view(self, weight: Tensor) -> Tensor:
        """``[num_classes, k, d]`` view of W's landmark columns (non-landmark class dropped)."""
        return weight.t().view(self.num_outputs, self.sub_centers, self.embedding_size)[: self.num_classes]

    def class_weight_matrix(self) -> Tensor:
        """``[num_classes, d]``, or ``[num_classes, k, d]`` with ``k = sub_centers > 1``."""
        view = self._class_view(self.arcface.W.detach())
        return view.squeeze(1) if self.sub_centers == 1 else view

    def imprint(self, class_indices: Tensor, vectors: Tensor) -> None:
        """Set classes' weight columns; with sub-centers, ``[n, d]`` vectors set all k of a class alike.

        Coinciding sub-centers tie in the max, so at first only one of them is trained; pass
        ``[n, k, d]`` (e.g. k-means centroids of the class) to start them apart.
        """
        weight = self.arcface.W
        class_indices, vectors = self._imprint_args(class_indices, vectors, self.sub_centers)
        if vectors.ndim == 2:
            vectors = vectors.unsqueeze(1)
        with torch.no_grad():
            self._class_view(weight)[class_indices.to(weight.device)] = vectors.to(weight)
