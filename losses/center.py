"""Softmax + center loss with the non-landmark handling of Boiarov & Tyantov (CIKM 2019).

PML has no center loss, so it is written here. Centers follow Wen et al. (ECCV 2016): they are
not trained by the optimizer but moved towards their class's embeddings by a fixed rate after
each training batch.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from core.labels import NONLANDMARK
from losses.base import MetricLoss, is_landmark


class CenterSoftmaxLoss(MetricLoss):
    """Cosine-softmax cross-entropy + λ · center loss, with non-landmarks kept away from centers.

    ``loss = CE + center_weight * L_center + nonlandmark_push_weight * L_push`` where

    * CE is over a cosine classifier: logits ``softmax_scale * cos(x, w_c)`` (NormFace-style).
      Embeddings are unit vectors, so a plain linear classifier could only sharpen its softmax by
      growing its weight norms; a fixed scale on cosines trains stably and suits weight imprinting.
      The classifier covers ``num_classes + 1`` classes when ``nonlandmark_class`` (non-landmarks
      are the last class), else only landmarks and non-landmarks are left out of CE.
    * ``L_center = ½ · mean over LANDMARK samples of ||x_i - c_{y_i}||²``. Non-landmarks have no
      center, so they are never pulled together.
    * ``L_push`` (only when ``nonlandmark_margin`` is set) = mean over non-landmark samples and all
      landmark centers of ``relu(margin - ||x - c_j||)²``: pushes non-landmarks out of a ball of
      radius ``margin`` around every landmark center.

    Centers are a buffer ``[num_classes, d]`` (saved in ``state_dict``, not trained by the
    optimizer), initialised to random unit vectors from the global torch RNG. In training mode,
    after the loss is computed, every class ``j`` present in the batch moves by Wen et al.'s rule
    ``c_j <- c_j - α · Σ_{i: y_i=j} (c_j - x_i) / (1 + n_j)``; absent classes and non-landmark
    samples move nothing. Under DDP (world size > 1) the landmark embeddings and labels of all
    ranks are gathered first, so every rank applies the identical update, equal to the
    single-process update on the concatenated batch. Gathering the batch rather than all-reducing
    per-class sums keeps the traffic proportional to the batch instead of ``num_classes * d``.

    Args:
        num_classes: Number of landmark classes.
        embedding_size: Dimension of the embeddings.
        center_weight: λ, weight of the center term.
        center_lr: α, the center update rate of Wen et al. (0 freezes the centers).
        softmax_scale: Scale s of the cosine logits.
        nonlandmark_class: Give non-landmarks one extra softmax class (index ``num_classes``);
            otherwise they take no part in the softmax.
        nonlandmark_margin: Radius (Euclidean distance on the unit sphere, at most 2) that
            non-landmark embeddings are pushed out of around every landmark center; ``None``
            disables the push term.
        nonlandmark_push_weight: Weight of the push term.
        nonlandmark_center: The *unmodified* center loss, for ablations: non-landmarks are an
            ordinary class with a center of their own (buffer ``nonlandmark_centroid``) that the
            center term pulls them towards. The paper's modification is to leave this off.
    """

    centers: Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        center_weight: float = 0.01,
        center_lr: float = 0.5,
        softmax_scale: float = 16.0,
        nonlandmark_class: bool = True,
        nonlandmark_margin: float | None = None,
        nonlandmark_push_weight: float = 0.1,
        nonlandmark_center: bool = False,
    ) -> None:
        super().__init__(num_classes, embedding_size)
        if nonlandmark_center and not nonlandmark_class:
            raise ValueError("nonlandmark_center needs nonlandmark_class: true (a center belongs to a class)")
        if not 0.0 <= center_lr <= 1.0:
            raise ValueError(f"center_lr must lie in [0, 1], got {center_lr}")
        self.center_weight = center_weight
        self.center_lr = center_lr
        self.softmax_scale = softmax_scale
        self.nonlandmark_class = nonlandmark_class
        self.nonlandmark_margin = nonlandmark_margin
        self.nonlandmark_push_weight = nonlandmark_push_weight
        num_outputs = num_classes + nonlandmark_class
        self.weight = torch.nn.Parameter(F.normalize(torch.randn(num_outputs, embedding_size), dim=1))
        self.register_buffer("centers", F.normalize(torch.randn(num_classes, embedding_size), dim=1))
        self.nonlandmark_center = nonlandmark_center
        if nonlandmark_center:
            self.register_buffer("nonlandmark_centroid", F.normalize(torch.randn(1, embedding_size), dim=1))

    def _compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        embeddings = embeddings.to(self.weight.dtype)
        landmark = is_landmark(labels)
        x_lm, y_lm = embeddings[landmark], labels[landmark]
        # Each term is added only when it has rows: empty means are NaN.
        loss = self._connected_zero(embeddings)

        logits = self.softmax_scale * F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))
        logits = self._mask_inactive(logits)
        if self.nonlandmark_class:
            targets = torch.where(landmark, labels, self.num_classes)
        else:
            logits, targets = logits[landmark], y_lm
        if targets.numel():
            loss = loss + F.cross_entropy(logits, targets)

        if self.nonlandmark_center:
            # Unmodified center loss: every image, non-landmarks included, is pulled to its center.
            table = torch.cat([self.centers, self.nonlandmark_centroid])
            diff = embeddings - table[torch.where(landmark, labels, self.num_classes)]
            loss = loss + self.center_weight * 0.5 * diff.pow(2).sum(dim=1).mean()
        elif y_lm.numel():
            # Indexing copies the centers' rows, so the in-place update below cannot invalidate
            # what autograd saved.
            diff = x_lm - self.centers[y_lm]
            loss = loss + self.center_weight * 0.5 * diff.pow(2).sum(dim=1).mean()

        if self.nonlandmark_margin is not None and not landmark.all():
            # cdist saves its inputs for backward; a snapshot keeps the in-place update legal.
            centers = self.centers.clone() if self.training and self.center_lr > 0 else self.centers
            centers = centers[self.class_active]  # not yet activated centers have not been placed
            dist_to_centers = torch.cdist(embeddings[~landmark], centers)
            push = F.relu(self.nonlandmark_margin - dist_to_centers).pow(2).mean()
            loss = loss + self.nonlandmark_push_weight * push

        if self.training and self.center_lr > 0:
            if self.nonlandmark_center:
                self._update_centers(embeddings.detach(), torch.where(landmark, labels, self.num_classes))
            else:
                self._update_centers(x_lm.detach(), y_lm)
        return loss

    @torch.no_grad()
    def _update_centers(self, x: Tensor, y: Tensor) -> None:
        """Wen et al.'s center update from this step's landmark embeddings (all ranks' under DDP)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x, y = _all_gather_rows(x, y)
        y_valid = y >= 0  # gathering pads with NONLANDMARK rows
        x, y = x[y_valid], y[y_valid]
        if not y.numel():
            return
        present, inverse = torch.unique(y, return_inverse=True)
        # One-hot matmul rather than index_add_: deterministic on GPU, so all ranks compute
        # bit-identical centers from the identical gathered batch.
        onehot = F.one_hot(inverse, present.numel()).t().to(self.centers.dtype)
        sums, counts = onehot @ x.to(self.centers.dtype), onehot.sum(dim=1, keepdim=True)
        table = torch.cat([self.centers, self.nonlandmark_centroid]) if self.nonlandmark_center else self.centers
        old = table[present]
        # Σ_i (c_j - x_i) = n_j c_j - Σ_i x_i
        table[present] = old - self.center_lr * (counts * old - sums) / (1 + counts)
        if self.nonlandmark_center:
            self.centers.copy_(table[: self.num_classes])
            self.nonlandmark_centroid.copy_(table[self.num_classes :])

    def class_weight_matrix(self) -> Tensor:
        """The landmark rows ``[num_classes, d]`` of the cosine classifier (centers: ``.centers``)."""
        return self.weight.detach()[: self.num_classes]

    def imprint(self, class_indices: Tensor, vectors: Tensor) -> None:
        """Set both the classifier rows and the centers of the given classes to ``vectors``."""
        class_indices, vectors = self._imprint_args(class_indices, vectors)
        with torch.no_grad():
            self.weight[class_indices.to(self.weight.device)] = vectors.to(self.weight)
            self.centers[class_indices.to(self.centers.device)] = vectors.to(self.centers)


def _all_gather_rows(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's ``x: [n_r, d]`` and ``y: [n_r]`` in rank order (``n_r`` may differ).

    Collectives need equal shapes, so sizes are exchanged first and rows padded to the largest.
    Every rank must call this on every training step, even with no landmark rows of its own.
    """
    world_size = dist.get_world_size()
    size = torch.tensor([y.numel()], device=y.device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes_list = [int(s) for s in sizes]
    longest = max(sizes_list)
    if longest == 0:
        return x, y
    pad = longest - y.numel()
    x_padded = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    y_padded = torch.cat([y, y.new_full((pad,), NONLANDMARK)])
    xs = [torch.empty_like(x_padded) for _ in range(world_size)]
    ys = [torch.empty_like(y_padded) for _ in range(world_size)]
    dist.all_gather(xs, x_padded)
    dist.all_gather(ys, y_padded)
    return (
        torch.cat([xr[:n] for xr, n in zip(xs, sizes_list)]),
        torch.cat([yr[:n] for yr, n in zip(ys, sizes_list)]),
    )
