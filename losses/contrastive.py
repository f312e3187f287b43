"""Contrastive loss with pair mining, via pytorch-metric-learning."""

from typing import Literal

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import LpDistance
from torch import Tensor

from losses.base import MetricLoss, check_max_cosine, is_landmark, push_from_nearest


class ContrastiveLoss(MetricLoss):
    """Contrastive loss (Hadsell et al. 2006) over mined pairs of the batch.

    Wraps PML's ``ContrastiveLoss``: positive pairs pay ``relu(dist - pos_margin)``, negative
    pairs ``relu(neg_margin - dist)``, each averaged over its non-zero terms. Loss and miners use
    PML's default ``LpDistance`` (Euclidean, re-normalising its inputs): for unit vectors
    ``dist = sqrt(2 - 2 cos)``, a monotone function of cosine similarity in ``[0, 2]``, so all
    margins below are Euclidean distances on the unit sphere (0.5 ~ 29 degrees, 0.8 ~ 47 degrees).

    Non-landmark images are relabelled so that each has a label of its own
    (``num_classes + its position in the batch``, see :meth:`pair_labels`): they never form a
    positive pair -- not even with each other -- and act only as negatives for every other image.

    The loss has no per-class weights: :meth:`class_weight_matrix` is ``None`` and :meth:`imprint`
    does nothing.

    Args:
        num_classes: Number of landmark classes.
        embedding_size: Dimension of the embeddings.
        pos_margin: Positive pairs closer than this distance cost nothing. The default 0.5
            (cosine 0.875) lets a landmark's photos keep their spread instead of collapsing onto one
            point: against 0, recall at FPR 1e-3 rose in each of 5 seeds at the demo's budget (mean
            0.395 → 0.503, P@1 0.903 → 0.899; EXPERIMENTS.md, "The non-landmark push on contrastive
            and the center loss, and contrastive's positive margin").
        neg_margin: Negative pairs farther than this distance cost nothing. The default 1.2
            (cosine 0.28) pushes every negative pair that is not already nearly orthogonal. At
            the demo's budget it measured best (P@1 0.843 on the seed-0 world, seed 0) against
            1.0 (0.676), 1.4 (0.633) and the old 0.5 (cosine 0.875; 0.507, barely above the
            untrained network's 0.476; all measured with ``pos_margin`` 0): with every positive pair
            pulled together, a negative margin that only pushes near-duplicates lets the classes
            collapse into each other (EXPERIMENTS.md, "Paper ablation").
        miner: Which pairs enter the loss. ``"none"`` (the default; it measured best, above the
            multi-similarity miner's 0.645 and the pair-margin miner's 0.507): all pairs of the batch.
            ``"pair_margin"``: positives farther than ``miner_pos_margin`` and negatives closer
            than ``miner_neg_margin`` (PML ``PairMarginMiner``). ``"batch_hard"``: per anchor, its
            farthest positive and closest negative (PML ``BatchHardMiner``).
            ``"multi_similarity"``: pairs that are hard relative to the anchor's other pairs, by
            ``multi_similarity_epsilon`` (PML ``MultiSimilarityMiner``, Wang et al. 2019).
        miner_pos_margin: ``pair_margin`` miner: keep positive pairs with distance above this.
        miner_neg_margin: ``pair_margin`` miner: keep negative pairs with distance below this.
        multi_similarity_epsilon: ``multi_similarity`` miner's ε (in the miner's distance).
        memory_size: > 0: a cross-batch memory (PML ``CrossBatchMemory``, Wang et al. 2020) of
            the last ``memory_size`` embeddings; each batch's anchors are paired with the whole
            memory (mined by ``miner``), not only with the batch. The memory is not checkpointed:
            a resumed fit refills it within ``memory_size / batch`` steps.
        nonlandmark_max_cosine: when set, non-landmark images also pay
            ``nonlandmark_push_weight · mean relu(max_j cos(x, y_j) - τ)²`` with ``τ`` this value,
            over the batch's landmark photos ``y_j`` (:func:`losses.base.push_from_nearest`, ArcFace's
            push with photos in place of class weights, which contrastive has none of). The pairs
            above already push every non-landmark below ``neg_margin`` from every photo, averaged
            over all of them; a distractor is accepted through its single nearest photo, and this
            term pays for that one. The argument names are ArcFace's, so
            ``recipes/nonlandmark_push.yaml`` applies to both. Off by default, and not in
            ``contrastive.yaml``: at the demo's budget every setting tried lowered recall at FPR
            1e-3, from 0.431 to 0.175-0.357, with the photos held still too (EXPERIMENTS.md, "The
            non-landmark push on contrastive and the center loss").
        nonlandmark_push_weight: weight of that term.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        pos_margin: float = 0.5,
        neg_margin: float = 1.2,
        miner: Literal["none", "pair_margin", "batch_hard", "multi_similarity"] = "none",
        miner_pos_margin: float = 0.2,
        miner_neg_margin: float = 0.8,
        multi_similarity_epsilon: float = 0.1,
        memory_size: int = 0,
        nonlandmark_max_cosine: float | None = None,
        nonlandmark_push_weight: float = 1.0,
    ) -> None:
        super().__init__(num_classes, embedding_size)
        check_max_cosine("nonlandmark_max_cosine", nonlandmark_max_cosine)
        self.nonlandmark_max_cosine = nonlandmark_max_cosine
        self.nonlandmark_push_weight = nonlandmark_push_weight
        self.contrastive = pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)
        if miner == "none":
            self.miner = None
        elif miner == "pair_margin":
            self.miner = pml_miners.PairMarginMiner(pos_margin=miner_pos_margin, neg_margin=miner_neg_margin)
        elif miner == "batch_hard":
            self.miner = pml_miners.BatchHardMiner()
        elif miner == "multi_similarity":
            # Distance-based like the loss, so epsilon is a Euclidean gap on the unit sphere.
            self.miner = pml_miners.MultiSimilarityMiner(epsilon=multi_similarity_epsilon, distance=LpDistance())
        else:
            raise ValueError(f"miner must be 'none', 'pair_margin', 'batch_hard' or 'multi_similarity', got {miner!r}")
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        self.memory = (
            pml_losses.CrossBatchMemory(self.contrastive, embedding_size, memory_size=memory_size, miner=self.miner)
            if memory_size
            else None
        )
        # Non-landmarks entering a memory need labels unique across batches, not only within one.
        self._nonlandmarks_seen = 0

    def pair_labels(self, labels: Tensor) -> Tensor:
        """Labels as given to PML: landmarks keep theirs, each non-landmark gets a unique one."""
        nonlandmark = ~is_landmark(labels)
        unique = self.num_classes + self._nonlandmarks_seen + torch.cumsum(nonlandmark.long(), dim=0) - 1
        return torch.where(nonlandmark, unique, labels)

    def _compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        # Half precision distances are too coarse for margins of a few tenths.
        embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
        if labels.numel() < 2:
            return self._connected_zero(embeddings)
        landmark = is_landmark(labels)
        loss = self._pair_loss(embeddings, labels)
        if self.nonlandmark_max_cosine is not None and landmark.any() and not landmark.all():
            push = push_from_nearest(embeddings[~landmark], embeddings[landmark], self.nonlandmark_max_cosine)
            loss = loss + self.nonlandmark_push_weight * push
        return loss

    def _pair_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        nonlandmarks = int((~is_landmark(labels)).sum())
        labels = self.pair_labels(labels)
        if self.memory is not None:
            if self.training:
                self._nonlandmarks_seen += nonlandmarks
            return self.memory(embeddings, labels)
        indices_tuple = None if self.miner is None else self.miner(embeddings, labels)
        # With no pair left PML returns `sum(embeddings * 0)`, still connected to the graph.
        return self.contrastive(embeddings, labels, indices_tuple)

    def class_weight_matrix(self) -> None:
        return None

    def imprint(self, class_indices: Tensor, vectors: Tensor) -> None:
        """Validate the arguments; there are no class weights to set."""
        self._imprint_args(class_indices, vectors)
