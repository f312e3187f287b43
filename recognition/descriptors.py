"""Global-descriptor post-processing of an index: PCA-whitening, database-side augmentation (DBA)
and α-query expansion (α-QE), the classic retrieval tricks (Jégou & Chum 2012; Arandjelović &
Zisserman 2012; Radenović et al. 2018), as options of ``landmarks index`` stored in the index.

* **PCA-whitening** is fitted without labels on the database embeddings (and the non-landmark
  pool, when the index has one) and applied to every vector the index compares: database photos
  before the per-landmark representation is built, queries, calibration photos and the pool.
  Component ``i`` is scaled by ``(λ_i + shrink · mean λ)^-power``: power 0.5 is full whitening,
  smaller powers are partial (power-law) whitening, and ``shrink`` keeps a covariance estimated
  from few photos from amplifying its noise directions. The directions the fitted photos do not
  span keep the ridge's scale rather than being dropped (dropping them cost recall at low FPR:
  a DB of 128 photos spans 127 of 1,280 dimensions, and a distractor's component outside them is
  what sets it apart). The output keeps the model's dimension, so every index part that checks
  the embedding size still agrees.
* **DBA** replaces each database photo by itself plus its ``dba`` nearest database photos, each
  weighted by ``max(cos, 0)^alpha``, before the representation is built.
* **α-QE** replaces each query by itself plus its ``query_expansion`` nearest index vectors,
  weighted the same way, before the search.

Every output is L2-normalised again. All are off by default: on the real photos none beat the
same index without it by more than the seed spread, and full whitening and QE with two
neighbours lose (EXPERIMENTS.md, "Real photos: whitening, query expansion and database-side
augmentation").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from retrieval.clustering import unit_rows
from retrieval.index import build_index, search

__all__ = ["DescriptorParams", "Whitening", "augment_database", "weighted_neighbours"]


@dataclass(frozen=True)
class DescriptorParams:
    """``landmarks index --whiten / --whiten-shrink / --dba / --query-expansion / --expansion-alpha``.

    ``whiten`` is the power (0: no whitening, 0.5: full); ``dba`` and ``query_expansion`` count
    neighbours (0: off); ``alpha`` is the neighbours' weight exponent for both.
    """

    whiten: float = 0.0
    whiten_shrink: float = 1.0
    dba: int = 0
    query_expansion: int = 0
    alpha: float = 3.0

    def __post_init__(self):
        if not 0.0 <= self.whiten <= 1.0:
            raise ValueError(f"whitening power must lie in [0, 1] (0.5 is full whitening), got {self.whiten}")
        if not self.whiten_shrink >= 0.0:
            raise ValueError(f"whitening shrinkage must be >= 0, got {self.whiten_shrink}")
        if self.dba < 0 or self.query_expansion < 0:
            raise ValueError(f"DBA and query expansion count neighbours (>= 0), got {self.dba} and "
                             f"{self.query_expansion}")
        if not self.alpha >= 0.0:
            raise ValueError(f"the neighbours' weight exponent must be >= 0, got {self.alpha}")

    @property
    def active(self) -> bool:
        return self.whiten > 0 or self.dba > 0 or self.query_expansion > 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Whitening:
    """``x -> unit((x - mean) @ projection)``; ``projection`` is ``[d, d]``, symmetric."""

    mean: np.ndarray
    projection: np.ndarray

    def __post_init__(self):
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        self.projection = np.ascontiguousarray(self.projection, dtype=np.float32)
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if self.projection.shape != (d, d):
            raise ValueError(f"whitening: mean {self.mean.shape} and projection {self.projection.shape} "
                             "must be [d] and [d, d]")

    @classmethod
    def fit(cls, photos: np.ndarray, power: float, shrink: float, groups=None) -> "Whitening":
        """``(C + r·I)^-power`` for the covariance ``C`` of ``photos`` (unit rows; at least 2) and the
        ridge ``r = shrink · mean λ`` (λ: the non-zero eigenvalues of ``C``): each principal direction
        is scaled by ``(λ + r)^-power``, and the directions the photos do not span (a DB smaller than
        the embedding size spans few) by ``r^-power``, so a query's component there is kept, not
        dropped. With ``shrink`` 0 those directions are projected out.

        With ``groups`` (one label per photo, e.g. landmark ids), ``C`` is instead the scatter of
        the differences of matching pairs, ``Σ_{i<j, same group} (x_i − x_j)(x_i − x_j)ᵀ``:
        Radenović et al.'s learned whitening (TPAMI 2018), up to its rotation, which a cosine
        search does not see. It equals ``Σ_g n_g Σ_{i∈g} (x_i − m_g)(x_i − m_g)ᵀ``, which is what
        is decomposed; the centring mean stays that of all photos."""
        x = np.asarray(photos, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"whitening needs at least 2 photos to fit on, got {len(x)}")
        mean = x.mean(axis=0)
        spread = x - mean if groups is None else _pair_spread(x, np.asarray(groups))
        _, s, vt = np.linalg.svd(spread, full_matrices=False)
        var = s ** 2 / len(x)
        keep = var > 1e-8 * var[0]  # directions with (numerically) no variance
        v, var = vt[keep].T, var[keep]
        ridge = shrink * var.mean()
        scale = (var + ridge) ** (-power)
        rest = ridge ** (-power) if ridge > 0 else 0.0
        projection = rest * np.eye(x.shape[1]) + (v * (scale - rest)) @ v.T
        return cls(mean, projection)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return unit_rows((np.asarray(x, dtype=np.float32) - self.mean) @ self.projection, "whitened embeddings",
                         dtype=np.float32)


def _pair_spread(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Rows whose scatter is that of the matching pairs' differences: ``√n_g · (x_i − m_g)``."""
    if groups.shape != (len(x),):
        raise ValueError(f"learned whitening: {len(groups)} group labels for {len(x)} photos")
    spread = np.zeros_like(x)
    for group in np.unique(groups):
        member = groups == group
        spread[member] = (x[member] - x[member].mean(axis=0)) * np.sqrt(member.sum())
    if not np.any(spread):
        raise ValueError("learned whitening needs a group with at least 2 different photos")
    return spread


def weighted_neighbours(x: np.ndarray, pool: np.ndarray, k: int, alpha: float, skip_self: bool = False,
                        index=None, memory_budget_mb: float = 256) -> np.ndarray:
    """Unit rows of ``x + Σ_{top-k rows p of pool} max(cos(x, p), 0)^alpha · p`` (α-QE, and DBA
    with ``pool = x`` and ``skip_self``: a row is not its own neighbour). The neighbours come from
    ``index`` (a FAISS index over ``pool``; a neighbour an approximate index does not find adds
    nothing), or an exact search."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    k = min(int(k), len(pool) - int(skip_self))
    if k <= 0:
        return unit_rows(x, dtype=np.float32)
    depth = k + int(skip_self)
    index = build_index(pool, kind="flat") if index is None else index
    sims, ids = search(index, x, depth, memory_budget_mb=memory_budget_mb)
    if skip_self:
        # Drop each row's own entry (or, for a duplicate ranked above it, the last one).
        own = ids == np.arange(len(x))[:, None]
        drop = np.where(own.any(axis=1), own.argmax(axis=1), depth - 1)
        keep = np.ones_like(own)
        keep[np.arange(len(x)), drop] = False
        sims, ids = sims[keep].reshape(len(x), k), ids[keep].reshape(len(x), k)
    weights = np.where(ids >= 0, np.clip(sims, 0.0, None) ** alpha, 0.0).astype(np.float32)
    return unit_rows(x + np.einsum("nk,nkd->nd", weights, pool[np.maximum(ids, 0)]), dtype=np.float32)


def augment_database(embeddings: np.ndarray, neighbours: int, alpha: float) -> np.ndarray:
    """DBA: each database photo plus its ``neighbours`` nearest other database photos, weighted."""
    return weighted_neighbours(embeddings, embeddings, neighbours, alpha, skip_self=True)
