"""Per-landmark representations for the recognition index: shooting-angle centroids, or baselines.

A landmark is photographed from a few typical shooting angles (front, side, interior, a detail,
the skyline) that look nothing alike, so one mean vector sits between them and matches none of
them well, while keeping every gallery photo costs memory and lets one mislabelled photo fire on
its own. The paper's middle road: cluster each landmark's embeddings hierarchically (one cluster
per angle), drop clusters too small to be a real angle (mostly label noise), and index the
normalised cluster means.

Representations (``kind``):

* ``"centroids"`` -- the above (:func:`retrieval.clustering.agglomerative_clusters` per landmark).
  A landmark with fewer than ``CentroidParams.few_photos`` photos has too few to find its angles
  (fewer than ``max_centroids`` clusters of ``min_cluster_size``): it keeps every photo (and,
  with ``few_photos_mean``, their mean too). Measured (EXPERIMENTS.md, "Inference" and "Real
  photos: the commands' defaults"): on real photos with 4–13 gallery photos per landmark cut
  clusters lost to both kNN and one mean; keeping the photos is level with kNN by construction,
  and the extra mean, which helped at 224 px, loses at the 320 px that backbone indexes now use
  (a mean of a few diverse photos is a hub that takes other landmarks' queries). Landmarks with
  more photos are clustered as before.
* ``"mean"``      -- one normalised mean per landmark (baseline).
* ``"all"``       -- every gallery embedding (full-gallery kNN, baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from retrieval.clustering import Linkage, agglomerative_clusters, cluster_centroids, unit_rows

__all__ = ["REPRESENTATIONS", "CentroidSet", "CentroidParams", "build_representation", "landmark_centroids"]

Representation = Literal["centroids", "mean", "all"]
REPRESENTATIONS: tuple[str, ...] = ("centroids", "mean", "all")


@dataclass(frozen=True)
class CentroidParams:
    """How landmarks are split into shooting-angle clusters.

    Attributes:
        distance_threshold: cosine distance at which the dendrogram is cut (see
            :func:`retrieval.clustering.agglomerative_clusters`).
        linkage: linkage method.
        max_centroids: most centroids a landmark keeps (its largest clusters).
        min_cluster_size: clusters with fewer images are dropped as label noise. A landmark whose
            largest cluster is smaller than this uses that size instead (a landmark with a
            handful of photos must stay recognisable; with 2 + 2 + 1 photos it keeps the pairs).
        few_photos: a landmark with fewer photos is not clustered: it keeps every photo (default
            15, set with the first defaults as ``max_centroids`` × ``min_cluster_size``; not
            measured again, as every synthetic landmark has at least 17 photos); 0 clusters every
            landmark.
        few_photos_mean: such a landmark also keeps the normalised mean of its photos (off by
            measurement, see the module docstring).

    The defaults: cut 0.15, clusters of >= 2 photos (EXPERIMENTS.md, "Centroids for the trained
    model"). The first sweep ("Inference") chose 0.3 and 3 for a model that separated far less: it
    matched full-gallery kNN on the clean database and kept that recall on the noisy one, where kNN
    lost three quarters of it. The demo's trained models put a landmark's photos closer together,
    so at 0.3 most landmarks became one cluster (110 vectors for 99 landmarks), below kNN over
    every photo at FPR 1e-3. At 0.15 and 2 the centroids beat the old cut in 14 of 16 indexes (11
    checkpoints, two scales; +0.022 to +0.038 of recall at 1e-3 on the four families' means) and
    match or beat kNN over every photo with a twelfth of its vectors. P@1 is 0.004-0.007 lower
    than with the old defaults, and 0.007-0.020 lower than kNN over every photo.
    """

    distance_threshold: float = 0.15
    linkage: Linkage = "average"
    max_centroids: int = 5
    min_cluster_size: int = 2
    few_photos: int = 15
    few_photos_mean: bool = False

    def __post_init__(self):
        if self.max_centroids < 1:
            raise ValueError(f"max_centroids must be >= 1, got {self.max_centroids}")
        if self.min_cluster_size < 1:
            raise ValueError(f"min_cluster_size must be >= 1, got {self.min_cluster_size}")
        if self.few_photos < 0:
            raise ValueError(f"few_photos must be >= 0, got {self.few_photos}")
        if not 0.0 <= self.distance_threshold <= 2.0:
            raise ValueError(f"distance_threshold is a cosine distance in [0, 2], got {self.distance_threshold}")


@dataclass
class CentroidSet:
    """Vectors to index and the landmark each one stands for.

    Attributes:
        vectors: float32 ``[m, d]`` unit-norm rows.
        landmark: int64 ``[m]``, row of :attr:`landmark_ids` each vector belongs to.
        sizes: int64 ``[m]``, gallery images summarised by each vector.
        landmark_ids: the landmarks, in first-appearance order of the input.
        images_per_landmark: int64 ``[len(landmark_ids)]`` gallery images of each landmark.
        represented: bool ``[n]`` over the input embeddings, in their order: False for the images
            in clusters that were dropped as too small, True for every other.
    """

    vectors: np.ndarray
    landmark: np.ndarray
    sizes: np.ndarray
    landmark_ids: list[str]
    images_per_landmark: np.ndarray
    represented: np.ndarray

    @property
    def dropped_images(self) -> int:
        """Images in clusters that were dropped as too small (not represented)."""
        return int((~self.represented).sum())

    @property
    def centroids_per_landmark(self) -> np.ndarray:
        return np.bincount(self.landmark, minlength=len(self.landmark_ids)).astype(np.int64)


def landmark_centroids(
    embeddings: np.ndarray, params: CentroidParams = CentroidParams()
) -> tuple[np.ndarray, np.ndarray, int]:
    """Shooting-angle centroids of ONE landmark's embeddings.

    Returns ``(centroids float32 [c, d], sizes int64 [c], dropped_images)`` with clusters ordered
    by decreasing size, ``1 <= c <= params.max_centroids``.
    """
    centroids, sizes, kept = _kept_clusters(embeddings, params)
    return centroids, sizes, int((~kept).sum())


def _kept_clusters(embeddings: np.ndarray, params: CentroidParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`landmark_centroids`, with a bool mask of the rows in kept clusters instead of the count of the others."""
    x = unit_rows(embeddings)
    if len(x) == 0:
        raise ValueError("a landmark without embeddings has no centroid")
    labels = agglomerative_clusters(x, params.distance_threshold, params.linkage)
    sizes = np.bincount(labels)  # labels are numbered by decreasing size
    keep = np.flatnonzero(sizes >= min(params.min_cluster_size, sizes[0]))[: params.max_centroids]
    kept_labels = np.where(np.isin(labels, keep), labels, -1)
    # keep is a prefix 0..c-1 of the size order, so the surviving labels are already contiguous.
    centroids = cluster_centroids(x, kept_labels)
    return centroids, sizes[keep].astype(np.int64), kept_labels >= 0


def build_representation(
    embeddings: np.ndarray,
    landmark_ids: Sequence[str],
    kind: Representation = "centroids",
    params: CentroidParams = CentroidParams(),
    progress: bool = False,
) -> CentroidSet:
    """Vectors that stand for each landmark of a gallery (see the module docstring for ``kind``).

    Args:
        embeddings: ``[n, d]`` gallery embeddings (rows are re-normalised; NaN/zero rows refused).
        landmark_ids: ``n`` landmark ids (text).
        kind: ``"centroids"``, ``"mean"`` or ``"all"``.
        params: clustering parameters (``"centroids"`` only).
        progress: a tqdm bar over landmarks.
    """
    if kind not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {kind!r}; expected one of {REPRESENTATIONS}")
    # float32 for the whole gallery (a million rows: 2 GB, not 4); each landmark's rows are
    # re-normalised in float64 where they are clustered or averaged.
    x = unit_rows(embeddings, "gallery embeddings", dtype=np.float32)
    ids = [str(i) for i in landmark_ids]
    if len(ids) != len(x):
        raise ValueError(f"{len(x)} embeddings but {len(ids)} landmark ids")
    if len(x) == 0:
        raise ValueError("cannot build an index from an empty gallery")
    # Landmarks in order of first appearance, so the index does not depend on how ids sort.
    position: dict[str, int] = {}
    per_row = np.fromiter((position.setdefault(i, len(position)) for i in ids), np.int64, len(ids))
    unique_ids = list(position)
    counts = np.bincount(per_row, minlength=len(unique_ids)).astype(np.int64)

    represented = np.ones(len(x), dtype=bool)
    if kind == "all":
        return CentroidSet(x, per_row.astype(np.int64), np.ones(len(x), np.int64), unique_ids, counts, represented)
    if kind == "mean":
        return CentroidSet(cluster_centroids(x, per_row), np.arange(len(unique_ids), dtype=np.int64), counts.copy(),
                           unique_ids, counts, represented)

    members = np.argsort(per_row, kind="stable")
    bounds = np.r_[0, np.cumsum(counts)]
    groups = range(len(unique_ids))
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="shooting-angle clusters", unit="landmark")
    vectors, owners, sizes = [], [], []
    for g in groups:
        rows = members[bounds[g]:bounds[g + 1]]
        if len(rows) < params.few_photos:
            c, s = x[rows].astype(np.float32), np.ones(len(rows), np.int64)
            if len(rows) > 1 and params.few_photos_mean:
                c = np.concatenate([c, cluster_centroids(x[rows], np.zeros(len(rows), np.int64))])
                s = np.r_[s, len(rows)]
        else:
            c, s, kept = _kept_clusters(x[rows], params)
            represented[rows] = kept
        vectors.append(c)
        owners.append(np.full(len(c), g, np.int64))
        sizes.append(s)
    return CentroidSet(np.concatenate(vectors), np.concatenate(owners), np.concatenate(sizes), unique_ids, counts,
                       represented)
