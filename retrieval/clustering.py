"""Agglomerative clustering of one landmark's embeddings into shooting-angle clusters.

Shared by database cleaning (valid clusters vs stray images) and by the inference index (one
centroid per typical shooting angle). fastcluster does the linkage (the same dendrogram as
scipy's, in less time and memory); scipy's ``fcluster`` cuts it at a distance threshold.
Memory is O(n²) in the size of *one* landmark, never of the database.
"""

from __future__ import annotations

from typing import Literal

import fastcluster
import numpy as np
from scipy.cluster.hierarchy import fcluster

Linkage = Literal["average", "complete", "single", "weighted", "ward", "centroid", "median"]
# Linkages defined on Euclidean geometry: run on unit vectors, where squared Euclidean distance
# is 2 x cosine distance, and the threshold is converted so it still reads as cosine distance.
_EUCLIDEAN_LINKAGES = ("ward", "centroid", "median")

__all__ = ["Linkage", "agglomerative_clusters", "cluster_centroids", "condensed_cosine_distances", "unit_rows"]


def unit_rows(embeddings: np.ndarray, what: str = "embeddings", dtype=np.float64) -> np.ndarray:
    """A copy with L2-normalised rows (float64 unless ``dtype``); refuses NaN/inf and zero rows,
    naming the row. Normalised in place in the one copy, so the peak is the input plus one copy
    (a million 512-d rows: 4 GB in float64, 2 GB in float32, not twice that)."""
    x = np.array(embeddings, dtype=dtype, copy=True)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(bad)[0])} has NaN or inf ({int(bad.sum())} rows in all)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros")
    x /= norms
    return x


def condensed_cosine_distances(unit: np.ndarray, block_rows: int = 256) -> np.ndarray:
    """Cosine distances of unit rows in scipy's condensed order (float64, ``n(n-1)/2``).

    Computed with BLAS in row blocks: several times faster than fastcluster's own cosine
    ``pdist``, and never holds the full ``n x n`` matrix (peak: the condensed vector + one block).
    """
    n = len(unit)
    out = np.empty(n * (n - 1) // 2, dtype=np.float64)
    start = 0
    for a in range(0, n, block_rows):
        b = min(n, a + block_rows)
        block = 1.0 - unit[a:b] @ unit[a:].T  # rows a..b-1 against columns a..n-1
        np.clip(block, 0.0, 2.0, out=block)
        for i in range(a, b):
            row = block[i - a, i - a + 1:]
            out[start:start + len(row)] = row
            start += len(row)
    return out


def agglomerative_clusters(
    embeddings: np.ndarray,
    distance_threshold: float,
    linkage: Linkage = "average",
) -> np.ndarray:
    """Cluster labels ``0..k-1`` for each row, cutting the dendrogram at ``distance_threshold``.

    Distances are cosine distances (1 - cosine similarity) of the rows. For ``average``,
    ``complete``, ``single`` and ``weighted`` the threshold bounds the linkage's cosine distance;
    for ``ward``/``centroid``/``median`` it is converted to the Euclidean height of unit vectors
    (sqrt(2 d)), so one threshold reads alike across linkages. Labels are numbered by decreasing
    cluster size (ties: first row first), so the result does not depend on scipy's numbering.
    """
    x = unit_rows(embeddings)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    if linkage in _EUCLIDEAN_LINKAGES:
        tree = fastcluster.linkage_vector(x, method=linkage, metric="euclidean")
        cut = float(np.sqrt(2.0 * max(distance_threshold, 0.0)))
    else:
        tree = fastcluster.linkage(condensed_cosine_distances(x), method=linkage)
        cut = float(distance_threshold)
    raw = fcluster(tree, t=cut, criterion="distance")
    _, first, inverse, counts = np.unique(raw, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))  # biggest first, then first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse].astype(np.int64)


def cluster_centroids(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unit-norm mean of each cluster ``0..max(labels)``, as float32 ``[k, d]``.

    Rows with a negative label (e.g. clusters dropped as too small) are ignored.
    """
    x = unit_rows(embeddings)
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    sums = np.zeros((k, x.shape[1]))
    keep = labels >= 0
    np.add.at(sums, labels[keep], x[keep])
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a cluster's embeddings sum to zero; its centroid has no direction")
    return (sums / norms).astype(np.float32)
