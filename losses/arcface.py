"""ArcFace (additive angular margin) and sub-center ArcFace, via pytorch-metric-learning.

PML applies one margin to every target cosine. The recipes here need a margin per row (per-class
dynamic margins, a margin that warms up), so :class:`_RowMargins` replaces PML's
``modify_cosine_of_target_classes`` by the same formula with a tensor margin; everything else
(weight layout, sub-center max, scaling, cross-entropy) stays PML's.
"""

import math
from typing import Literal

import numpy as np
import torch
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor

from core.labels import NONLANDMARK
from losses.base import MetricLoss, check_max_cosine, is_landmark, push_from_nearest


class _MaskedCosine:
    """Mixin for PML's ArcFace losses: curriculum-inactive classes' cosines are masked out of the softmax.

    ``pooled_columns > 1``: the last that many columns of W are one class's centres (the
    non-landmark class's, see ``ArcFaceLoss.nonlandmark_centers``), and its cosine is their max,
    as sub-center ArcFace takes a class's cosine as the max over its sub-centres; 0 or 1 pools none.
    """

    pooled_columns = 1

    def __init__(self, *args, mask_fn, **kwargs):
        super().__init__(*args, **kwargs)
        self._mask_fn = mask_fn

    def get_cosine(self, embeddings):
        cosine = super().get_cosine(embeddings)
        pooled = self.pooled_columns
        if pooled > 1:
            cosine = torch.cat([cosine[:, :-pooled], cosine[:, -pooled:].amax(dim=1, keepdim=True)], dim=1)
        return self._mask_fn(cosine)


class _RowMargins:
    """Mixin for PML's ArcFace losses: ``row_margins`` (radians, one per row of the batch) replaces the scalar margin.

    PML selects the target cosines with ``cosine[mask == 1]``, one per row in row order, so the
    i-th target cosine belongs to row i. The formula is PML's, with the margin as a tensor:
    ``cos(θ + m)`` while ``θ ≤ π - m``, else ``cos θ - m sin m`` (keeps the logit monotone).
    """

    row_margins: Tensor | None = None

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        margins = self.row_margins
        if margins is None:
            return super().modify_cosine_of_target_classes(cosine_of_target_classes)
        angles = self.get_angles(cosine_of_target_classes)
        margins = margins.to(angles)
        return torch.where(
            angles <= math.pi - margins, torch.cos(angles + margins), torch.cos(angles) - margins * torch.sin(margins)
        )


class _MaskedArcFace(_RowMargins, _MaskedCosine, pml_losses.ArcFaceLoss):
    pass


class _MaskedSubCenterArcFace(_RowMargins, _MaskedCosine, pml_losses.SubCenterArcFaceLoss):
    pass


class ArcFaceLoss(MetricLoss):
    """ArcFace (Deng et al. 2019) or, with ``sub_centers > 1``, sub-center ArcFace (Deng et al. 2020).

    Wraps PML's ``ArcFaceLoss`` / ``SubCenterArcFaceLoss``. PML keeps the class weights as one
    parameter ``W`` of shape ``[d, num_outputs * sub_centers]`` (class ``c``'s sub-centers are
    columns ``c*k .. c*k+k-1``; with ``nonlandmark_centers=K``, ``[d, num_classes + K]``, the
    background's K columns last); the PML module is a registered submodule, so ``W`` is trained by
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
            ``num_classes``), a background class that is scored in the softmax but never indexed,
            so the classifier learns to reject them. ``"ignore"``: they are dropped from the softmax.
        nonlandmark_centers: with ``nonlandmarks="class"`` and ``sub_centers=1``: the background
            class's weight columns (the last ones of W); its cosine is the max over them, so the
            non-landmarks, unlike one landmark, need not gather at one point. ``None``: as many as
            a landmark class has (``sub_centers``).
        margin_warmup_steps: the margin grows linearly from 0 to its full value over the first N
            training batches (``margin × min(1, t / N)`` at batch ``t``, counted from 0 by the
            persistent buffer ``step``, so a resumed fit continues the ramp). 0: full margin from
            the start.
        dynamic_margins: per-class margins that grow as a class gets smaller (the GLDv2 2020
            winners' recipe): ``m_c = a · n_c^(-margin_power) + b``, with ``a, b`` set so that the
            smallest training class gets ``margin`` and the largest ``margin_min``. Class sizes
            come from the training data (:meth:`set_class_sizes`, called at fit start).
        margin_min: dynamic margins: the largest class's margin, in degrees.
        margin_power: dynamic margins: the exponent λ.
        nonlandmark_max_cosine: when set, non-landmark images also pay
            ``nonlandmark_push_weight · mean relu(max_c cos(x, w_c) - τ)²`` with ``τ`` this value:
            they are pushed below cosine ``τ`` to every active landmark's weight(s), the part of
            the embedding space that a calibrated threshold at low FPR depends on.
        nonlandmark_push_weight: weight of that term.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64.0,
        sub_centers: int = 1,
        nonlandmarks: Literal["ignore", "class"] = "ignore",
        margin_warmup_steps: int = 0,
        dynamic_margins: bool = False,
        margin_min: float = 5.7,
        margin_power: float = 0.25,
        nonlandmark_max_cosine: float | None = None,
        nonlandmark_push_weight: float = 1.0,
        nonlandmark_centers: int | None = None,
    ) -> None:
        super().__init__(num_classes, embedding_size)
        if margin_warmup_steps < 0:
            raise ValueError(f"margin_warmup_steps must be >= 0, got {margin_warmup_steps}")
        if dynamic_margins and not 0 <= margin_min <= margin:
            raise ValueError(f"margin_min must lie in [0, margin={margin}], got {margin_min}")
        check_max_cosine("nonlandmark_max_cosine", nonlandmark_max_cosine)
        self.margin = float(margin)
        self.margin_warmup_steps = margin_warmup_steps
        self.dynamic_margins = dynamic_margins
        self.margin_min = float(margin_min)
        self.margin_power = float(margin_power)
        self.nonlandmark_max_cosine = nonlandmark_max_cosine
        self.nonlandmark_push_weight = nonlandmark_push_weight
        # Training batches seen (the margin warm-up's clock) and each output class's margin in
        # degrees; both persistent, so a resumed fit has the margins of the interrupted one.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("class_margins", torch.full((num_classes + (nonlandmarks == "class"),), float(margin)))
        if sub_centers < 1:
            raise ValueError(f"sub_centers must be >= 1, got {sub_centers}")
        if nonlandmarks not in ("ignore", "class"):
            raise ValueError(f"nonlandmarks must be 'ignore' or 'class', got {nonlandmarks!r}")
        if nonlandmark_centers is not None and (nonlandmarks != "class" or nonlandmark_centers < 1):
            raise ValueError(
                f"nonlandmark_centers needs nonlandmarks='class' and a value >= 1, got {nonlandmark_centers}"
            )
        if nonlandmark_centers not in (None, sub_centers) and sub_centers != 1:
            raise ValueError(f"nonlandmark_centers={nonlandmark_centers} needs sub_centers=1, got {sub_centers}")
        self.sub_centers = sub_centers
        self.nonlandmarks = nonlandmarks
        self.num_outputs = num_classes + (nonlandmarks == "class")
        self.nonlandmark_centers = (nonlandmark_centers or sub_centers) if nonlandmarks == "class" else 0
        if sub_centers == 1:
            self.arcface = _MaskedArcFace(
                num_classes + self.nonlandmark_centers,
                embedding_size,
                margin=margin,
                scale=scale,
                mask_fn=self._mask_inactive,
            )
            # PML sizes W by num_classes when it is built, and the target mask by num_classes when
            # called: W gets every column, the mask one per class once the background's are pooled.
            self.arcface.pooled_columns = self.nonlandmark_centers
            self.arcface.num_classes = self.num_outputs
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the margin schedule existed: the full, uniform margin.
        for name in ("step", "class_margins"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_class_sizes(self, counts) -> None:
        """Training images per landmark class → the dynamic margins (no-op unless ``dynamic_margins``)."""
        if not self.dynamic_margins:
            return
        self.class_margins.copy_(torch.as_tensor(self.dynamic_margin_table(counts), dtype=self.class_margins.dtype))

    def dynamic_margin_table(self, counts) -> np.ndarray:
        """Margins in degrees for classes of ``counts`` images (+ ``margin`` for a non-landmark class)."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (self.num_classes,) or (counts < 1).any():
            raise ValueError(f"need one count >= 1 per landmark class ({self.num_classes}), got shape {counts.shape}")
        decay = counts ** -self.margin_power
        spread = decay.max() - decay.min()
        if spread <= 0:  # every class the same size
            table = np.full(self.num_classes, self.margin)
        else:
            a = (self.margin - self.margin_min) / spread
            table = a * decay + (self.margin_min - a * decay.min())
        return np.append(table, [self.margin] * (self.num_outputs - self.num_classes))

    def margin_scale(self, step: int | None = None) -> float:
        """The warm-up's fraction of the full margin at training batch ``step`` (default: now)."""
        step = int(self.step) if step is None else step
        return 1.0 if self.margin_warmup_steps <= 0 else min(1.0, step / self.margin_warmup_steps)

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
        scale = self.margin_scale()
        if self.training:
            self.step += 1
        if not targets.numel():
            loss = self._connected_zero(embeddings)
        else:
            margins = self.class_margins[targets] * scale
            self.arcface.row_margins = torch.deg2rad(margins)
            try:
                loss = self.arcface(rows, targets)
            finally:
                self.arcface.row_margins = None
        if self.nonlandmark_max_cosine is not None and not is_landmark(labels).all():
            loss = loss + self.nonlandmark_push_weight * self.nonlandmark_push(embeddings[~is_landmark(labels)])
        return loss

    def nonlandmark_push(self, nonlandmark_embeddings: Tensor) -> Tensor:
        """``mean relu(max_c cos(x, w_c) - τ)²`` over non-landmark rows, active classes' weights only."""
        weights = self._class_view(self.arcface.W)[self.class_active].reshape(-1, self.embedding_size)
        return push_from_nearest(nonlandmark_embeddings, weights, self.nonlandmark_max_cosine)

    def _class_view(self, weight: Tensor) -> Tensor:
        """``[num_classes, k, d]`` view of W's landmark columns (the non-landmark class's dropped)."""
        landmark_columns = weight.t()[: self.num_classes * self.sub_centers]
        return landmark_columns.view(self.num_classes, self.sub_centers, self.embedding_size)

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
