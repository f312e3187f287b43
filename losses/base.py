"""The interface every metric loss of the project implements.

The LightningModule is given a loss *factory* (``Callable[[int, int], MetricLoss]``, built by
LightningCLI from ``class_path`` + ``init_args``) and calls it as
``loss_factory(num_classes, embedding_size)``. Every subclass therefore takes exactly those two
positional parameters first, followed by keyword parameters with defaults and type hints.
"""

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from core.labels import NONLANDMARK


class MetricLoss(torch.nn.Module, ABC):
    """A loss over a batch of L2-normalised embeddings and their labels.

    Labels follow :mod:`core.labels`: landmark images carry a class index in
    ``[0, num_classes)``, non-landmark images carry :data:`~core.labels.NONLANDMARK`.
    Non-landmark images are *not* a landmark class: they have no shared identity, so no loss may
    pull two of them together. What a loss may do with them is subclass-specific and documented
    there: treat them as one extra classifier class (index ``num_classes``, so the classifier
    learns to reject them), use them only as negatives (contrastive), push them away from the
    landmark centers (center loss), or ignore them.

    The loss's own trainable weights are registered parameters (trained by the module's optimizer,
    saved in ``state_dict``, synchronised by DDP). Non-gradient state such as center-loss centers
    lives in buffers and is updated inside :meth:`forward` under ``torch.no_grad()``, and only
    while ``self.training``, so validation never changes it.

    Args:
        num_classes: Number of landmark classes (non-landmarks excluded).
        embedding_size: Dimension of the embeddings.
    """

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"need num_classes >= 1 and embedding_size >= 1, got {num_classes}, {embedding_size}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        # Landmark classes a curriculum has activated. Inactive classes take no part in any
        # softmax (they are neither targets nor negatives), so their weights stay as they were
        # until imprinted. Not persistent: the curriculum callback owns and restores this state.
        self.register_buffer("class_active", torch.ones(num_classes, dtype=torch.bool), persistent=False)

    def set_active_classes(self, class_indices: Tensor | None) -> None:
        """Restrict classifier-style losses to ``class_indices`` (``None``: every class)."""
        active = torch.ones(self.num_classes, dtype=torch.bool, device=self.class_active.device)
        if class_indices is not None:
            class_indices = torch.as_tensor(class_indices, dtype=torch.long).flatten()
            if class_indices.numel() and (class_indices.min() < 0 or class_indices.max() >= self.num_classes):
                raise ValueError(f"active class indices must lie in [0, {self.num_classes})")
            active.zero_()
            active[class_indices.to(active.device)] = True
        self.class_active.copy_(active)

    def set_class_sizes(self, counts) -> None:
        """Training images per landmark class, given at fit start; losses that use them override this."""

    def _mask_inactive(self, logits: Tensor) -> Tensor:
        """Exclude inactive landmark columns (the first ``num_classes``) from a softmax."""
        if bool(self.class_active.all()):
            return logits
        keep = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        keep[: self.num_classes] = self.class_active
        # A large finite value, not -inf: exp() underflows to exactly 0 and no inf-inf NaN can arise.
        return logits.masked_fill(~keep, -1e4)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Return the scalar loss for ``embeddings: [b, d]`` and ``labels: [b]``.

        Runs with autocast disabled: margins, scales of 16-64 and squared distances lose too much
        in float16/bfloat16, and PML's ArcFace would otherwise recast its weight matrix to the
        embeddings' half dtype in place. Subclasses cast the embeddings to their own precision.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"expected embeddings of shape [b, {self.embedding_size}], got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"expected labels of shape [{embeddings.shape[0]}], got {tuple(labels.shape)}")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self._compute(embeddings, labels.to(device=embeddings.device, dtype=torch.long))

    def _connected_zero(self, embeddings: Tensor) -> Tensor:
        """A zero loss for a batch with nothing to learn from (empty, or no usable rows).

        It still reaches the embeddings and every parameter of the loss, so autograd and DDP
        (which expects each parameter to take part in every step) see the usual graph.
        """
        return sum((p.sum() * 0 for p in self.parameters()), embeddings.sum() * 0)

    @abstractmethod
    def _compute(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss itself; inputs are already validated and on the same device."""

    @abstractmethod
    def class_weight_matrix(self) -> Tensor | None:
        """Per-landmark-class weight vectors, for weight imprinting.

        Returns ``[num_classes, d]`` (or ``[num_classes, k, d]`` with ``k`` sub-centers per class)
        as a detached view of the live weights -- change them through :meth:`imprint`, not in
        place -- or ``None`` when the loss has no per-class weights. Rows of an extra non-landmark
        class are not included.
        """

    @abstractmethod
    def imprint(self, class_indices: Tensor, vectors: Tensor) -> None:
        """Set the weights (and centers, where the loss has them) of ``class_indices`` to ``vectors``.

        Args:
            class_indices: ``LongTensor[n]`` of landmark class indices in ``[0, num_classes)``.
            vectors: ``[n, d]`` (or ``[n, k, d]`` for a loss with ``k`` sub-centers per class);
                they are L2-normalised here, so class-mean embeddings can be passed directly.
        """

    def _imprint_args(self, class_indices: Tensor, vectors: Tensor, sub_centers: int = 1) -> tuple[Tensor, Tensor]:
        """Validate :meth:`imprint`'s arguments; return them as (long indices, normalised vectors)."""
        class_indices = torch.as_tensor(class_indices, dtype=torch.long).flatten()
        allowed = [(class_indices.numel(), self.embedding_size)]
        if sub_centers > 1:
            allowed.append((class_indices.numel(), sub_centers, self.embedding_size))
        if tuple(vectors.shape) not in allowed:
            raise ValueError(f"vectors must have shape {' or '.join(map(str, allowed))}, got {tuple(vectors.shape)}")
        if class_indices.numel() and (class_indices.min() < 0 or class_indices.max() >= self.num_classes):
            raise ValueError(f"class indices must lie in [0, {self.num_classes}); non-landmarks cannot be imprinted")
        return class_indices, torch.nn.functional.normalize(vectors.detach(), dim=-1)


def is_landmark(labels: Tensor) -> Tensor:
    """Boolean mask of the landmark samples of a batch."""
    return labels != NONLANDMARK


def check_max_cosine(name: str, value: float | None) -> None:
    """A push target must be a cosine: ``None`` (no push) or a value in ``[-1, 1]``."""
    if value is not None and not -1.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [-1, 1], got {value}")


def nearest_cosine(rows: Tensor, references: Tensor) -> Tensor:
    """``[n]``: each row's highest cosine to any of ``references`` (neither needs unit norm)."""
    return (F.normalize(rows, dim=1) @ F.normalize(references, dim=1).t()).max(dim=1).values


def push_from_nearest(nonlandmarks: Tensor, references: Tensor, max_cosine: float) -> Tensor:
    """``mean relu(max_j cos(x, r_j) - τ)²`` over the rows ``x`` of ``nonlandmarks``.

    Each non-landmark pays for how far its nearest reference -- a class weight, a landmark photo --
    lies above cosine ``τ = max_cosine``. Only the nearest counts: at a low false-positive rate a
    distractor is accepted through its single best match. Gradients reach both sides. Neither input
    needs unit norm.
    """
    return F.relu(nearest_cosine(nonlandmarks, references) - max_cosine).pow(2).mean()
