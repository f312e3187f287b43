"""The cleaning decisions, on embedding arrays (no images, no files): Boiarov & Tyantov, §3.1.

1. **Per landmark** (in parallel, one landmark at a time per worker, so memory follows the largest
   class and never the database): agglomerative clustering of the landmark's embeddings
   (:func:`retrieval.clustering.agglomerative_clusters`, cosine distance, dendrogram cut at
   ``distance_threshold``). A cluster is *valid* if it holds at least ``min_cluster_size``
   images and at least ``min_cluster_fraction`` of the landmark's readable images. An image
   outside the valid clusters is noise (``small_cluster``) unless it lies within
   ``attach_distance`` of a valid cluster's centroid (then it is attached to that cluster: an
   unusual photo of a known angle that the cut split off). A landmark without a valid cluster is
   dropped (``landmark_dropped``). Several valid clusters are normal: one per typical shooting angle.
2. **Duplicates.** The centroids of all valid clusters go into a FAISS inner-product index. Two
   landmarks are the same structure under two ids when, for *each* of them, at least
   ``duplicate_min_share`` of its clustered images lie in clusters whose centroid is within cosine
   distance ``duplicate_distance`` of a valid cluster of the other. A group is formed only of
   landmarks that are pairwise duplicates (no chaining: a~b and b~c with a≁c never merge a and
   c); ``duplicates="merge"`` relabels a group to its largest member, ``"flag"`` only records it.
3. **Images closer to another landmark.** A kept image whose best similarity to another
   landmark's (another group's) valid centroids exceeds its best similarity to its own by more
   than ``reassign_margin`` is removed (``other_landmark``).
4. **Non-landmark pool (optional).** With non-landmark embeddings given, a kept image within
   cosine distance ``nonlandmark_distance`` of a non-landmark image, or (``nonlandmark_margin``)
   more similar to a non-landmark image than to its landmark's nearest centroid by more than the
   margin, is removed (``near_nonlandmark``).

Rows marked invalid (unreadable images) are removed first (``unreadable``). Every decision has a
reason string starting with its code; the codes are :data:`REASONS`.

**One set of defaults for every model.** An ImageNet backbone compresses distances (every photo
is within ~0.1-0.3 cosine distance of every other), a trained model spreads them out. With
``units="relative"`` (the default) every distance and margin above is a multiple of the
embedding's own scale, the median cosine distance between images of different landmarks
(:func:`embedding_scale`), so the same defaults cut a compressed and a spread embedding alike. **A model too weak to clean with** is not applied: when fewer than ``min_separability``
of the images have a nearest neighbour with their own label (:func:`label_agreement`), the
result keeps every readable row and carries the decisions it would have made in ``proposed``
(``clean_embeddings(force=True)`` applies them anyway). Cleaning is never worse than not
cleaning because of a model that cannot tell the landmarks apart.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Sequence

import numpy as np

from retrieval.clustering import Linkage, agglomerative_clusters

log = logging.getLogger(__name__)

__all__ = ["REASONS", "CleaningParams", "CleaningResult", "LandmarkClusters", "clean_embeddings", "cluster_landmark",
           "embedding_scale", "label_agreement"]

#: Reason codes, in order of precedence (the first that applies is reported).
REASONS = ("repeated_row", "unreadable", "landmark_dropped", "small_cluster", "other_landmark", "near_nonlandmark", "neighbour_evidence")

# Parameters in the embedding's units under ``units="relative"``: cosine distances, and margins
# between cosine similarities (see CleaningParams.resolved).
_DISTANCES = ("distance_threshold", "attach_distance", "duplicate_distance", "nonlandmark_distance")
_MARGINS = ("reassign_margin", "nonlandmark_margin", "evidence_threshold")
# The scale is measured on this many random pairs (the median of 20k distances is stable to the
# second decimal).
_SCALE_PAIRS = 20000
# Label agreement is measured on at most this many images (seeded sample) against the whole DB,
# by exact search. Past 100k images the sample shrinks so that queries × DB stays at 2e9 inner
# products (~40 s on 2 cores), but never below 2,000 (a standard error of about 0.01).
_AGREEMENT_QUERIES = 20000
_AGREEMENT_PRODUCTS = 2e9
_AGREEMENT_MIN_QUERIES = 2000

# Rows whose norm is below this are "no embedding" (embed_paths writes all-zero rows for them).
_ZERO_NORM = 1e-12
# Rows are normalised in float32 (FAISS), squares summed: a squared norm above this overflows.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Landmarks are handed to worker processes in batches of at least this many rows (fewer IPC
# round trips for the long tail of tiny classes).
_TASK_ROWS = 4096
# Rows per FAISS query chunk (bounds the float32 copy of the queries).
_QUERY_CHUNK = 65536


@dataclass(frozen=True)
class CleaningParams:
    """Every constant of the algorithm. The defaults were tuned on the synthetic demo world with a
    model trained on its noisy DB (EXPERIMENTS.md, "Database cleaning") in cosine units; that
    model's scale (:func:`embedding_scale`) is 1.01, so they stand unchanged as relative values
    (the ImageNet start's scale is 0.45: its thresholds come out 0.45× as large); a model trained on clean
    data separates noise better and prefers a looser cut without steps 3-4, and a model trained
    longer on the noisy DB does best with ``image_rule="evidence"`` (see there).

    Attributes:
        distance_threshold: cosine distance at which each landmark's dendrogram is cut.
        linkage: ``average`` (default), ``complete``, ``single``, ``weighted``, ``ward``, ...
        min_cluster_size: a valid cluster has at least this many images ...
        min_cluster_fraction: ... and at least this share of its landmark's readable images.
        attach_distance: an image outside the valid clusters whose cosine distance to the nearest
            valid centroid of its landmark is at most this is kept, attached to that cluster (an
            unusual photo of a known angle, split off by the dendrogram cut); ``None`` keeps only
            members of valid clusters.
        duplicate_distance: cosine distance under which two clusters' centroids coincide.
        duplicate_min_share: share of each landmark's clustered images that must lie in coinciding
            clusters for the pair to count as duplicates.
        duplicates: ``merge`` (relabel to the group's largest id) or ``flag`` (record only).
        reassign_margin: remove an image when another landmark's best centroid similarity exceeds
            its own landmark's by more than this (0 = any image closer to another landmark);
            ``None`` disables step 3 (duplicates are still found).
        nonlandmark_distance: with a non-landmark pool, remove images within this cosine
            distance of a non-landmark image; ``None`` disables this test.
        nonlandmark_margin: with a non-landmark pool, also remove images whose similarity to the
            nearest non-landmark image exceeds their similarity to their landmark's nearest valid
            centroid by more than this (closer to the non-landmarks than to their own landmark);
            ``None`` disables this test.
        image_rule: how single images are judged once the landmarks are clustered. ``clusters``
            (the paper's): an image outside the valid clusters is noise (``small_cluster``), and so
            is one closer to another landmark or to the non-landmarks (steps 3-4). ``evidence``:
            an image is noise when the evidence against it reaches ``evidence_threshold`` —
            ``max(other_k, pool_1) - own_k``, its mean cosine similarity to its ``evidence_k``
            nearest images of other landmarks (other duplicate groups), or to its nearest
            non-landmark photo, minus that to its ``evidence_k`` nearest images of its own
            landmark — whatever cluster it is in; steps 3-4 are then not run. Landmark-level
            decisions (no valid cluster: dropped; duplicates) are the same under both rules.
        evidence_k: neighbours averaged on each side of the evidence.
        evidence_threshold: evidence at which an image is removed (``image_rule="evidence"``).
        evidence_search: image neighbours retrieved per image to find its ``evidence_k`` nearest
            images of other landmarks; if fewer are among them, the missing ones count with the
            lowest similarity retrieved (an upper bound, so the evidence is never understated).
        neighbours: FAISS neighbours retrieved per query (centroids are few per landmark).
        index: FAISS index over centroids/pool: ``flat`` (exact), ``ivf``, ``hnsw`` or ``auto``
            (exact up to ``exact_index_limit`` vectors, IVF beyond).
        exact_index_limit: the ``auto`` switch point.
        units: ``relative`` (default): the distances and margins above are multiples of the
            embedding's scale (:func:`embedding_scale`); ``absolute``: cosine units as given.
        min_separability: the least :func:`label_agreement` a model needs for its decisions to
            be applied (below it they are only proposed; ``force=True`` applies them).
    """

    distance_threshold: float = 0.4
    linkage: Linkage = "average"
    min_cluster_size: int = 3
    min_cluster_fraction: float = 0.05
    attach_distance: float | None = 0.7
    duplicate_distance: float = 0.06
    duplicate_min_share: float = 0.5
    duplicates: Literal["merge", "flag"] = "merge"
    reassign_margin: float | None = 0.2
    nonlandmark_distance: float | None = None
    nonlandmark_margin: float | None = 0.3
    image_rule: Literal["clusters", "evidence"] = "clusters"
    evidence_k: int = 3
    evidence_threshold: float = 0.16
    evidence_search: int = 64
    neighbours: int = 10
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    exact_index_limit: int = 20000
    units: Literal["relative", "absolute"] = "relative"
    min_separability: float = 0.6

    def __post_init__(self):
        problems = []
        if self.units not in ("relative", "absolute"):
            problems.append(f"units must be 'relative' or 'absolute', got {self.units!r}")
        # Relative values are multiples of the embedding's scale: only their sign is bounded here;
        # the absolute values they resolve to are clipped to the cosine range.
        top = 2.0 if self.units == "absolute" else math.inf
        if not 0.0 <= self.distance_threshold <= top:
            problems.append(f"distance_threshold must be in [0, {top:g}], got {self.distance_threshold}")
        if self.linkage not in ("average", "complete", "single", "weighted", "ward", "centroid", "median"):
            problems.append(f"unknown linkage {self.linkage!r}")
        if self.min_cluster_size < 1:
            problems.append(f"min_cluster_size must be >= 1, got {self.min_cluster_size}")
        if not 0.0 <= self.min_cluster_fraction <= 1.0:
            problems.append(f"min_cluster_fraction must be in [0, 1], got {self.min_cluster_fraction}")
        if not 0.0 <= self.duplicate_distance <= top:
            problems.append(f"duplicate_distance must be in [0, {top:g}], got {self.duplicate_distance}")
        if not 0.0 < self.duplicate_min_share <= 1.0:
            problems.append(f"duplicate_min_share must be in (0, 1], got {self.duplicate_min_share}")
        if self.duplicates not in ("merge", "flag"):
            problems.append(f"duplicates must be 'merge' or 'flag', got {self.duplicates!r}")
        if self.reassign_margin is not None and not -top <= self.reassign_margin <= top:
            problems.append(f"reassign_margin must be in [-{top:g}, {top:g}] or None, got {self.reassign_margin}")
        if self.attach_distance is not None and not 0.0 <= self.attach_distance <= top:
            problems.append(f"attach_distance must be in [0, {top:g}] or None, got {self.attach_distance}")
        if self.nonlandmark_margin is not None and not -top <= self.nonlandmark_margin <= top:
            problems.append(f"nonlandmark_margin must be in [-{top:g}, {top:g}] or None, got {self.nonlandmark_margin}")
        if self.nonlandmark_distance is not None and not 0.0 <= self.nonlandmark_distance <= top:
            problems.append(f"nonlandmark_distance must be in [0, {top:g}] or None, got {self.nonlandmark_distance}")
        if self.image_rule not in ("clusters", "evidence"):
            problems.append(f"image_rule must be 'clusters' or 'evidence', got {self.image_rule!r}")
        if self.evidence_k < 1 or self.evidence_search < self.evidence_k:
            problems.append(f"need 1 <= evidence_k <= evidence_search, got {self.evidence_k}, {self.evidence_search}")
        if not -top <= self.evidence_threshold <= top:
            problems.append(f"evidence_threshold must be in [-{top:g}, {top:g}], got {self.evidence_threshold}")
        if self.neighbours < 1:
            problems.append(f"neighbours must be >= 1, got {self.neighbours}")
        if self.index not in ("auto", "flat", "ivf", "hnsw"):
            problems.append(f"index must be auto, flat, ivf or hnsw, got {self.index!r}")
        if not 0.0 <= self.min_separability <= 1.0:
            problems.append(f"min_separability must be in [0, 1], got {self.min_separability}")
        if problems:
            raise ValueError("invalid cleaning parameters: " + "; ".join(problems))

    def resolved(self, scale: float) -> "CleaningParams":
        """The absolute parameters for an embedding whose scale (:func:`embedding_scale`) is
        ``scale``: relative distances and margins are multiplied by it, then clipped to the cosine
        range; absolute parameters come back unchanged."""
        if self.units == "absolute":
            return self
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"the embedding's scale must be a positive number, got {scale}")
        changes = {}
        for name in _DISTANCES:
            value = getattr(self, name)
            changes[name] = None if value is None else float(min(2.0, value * scale))
        for name in _MARGINS:
            value = getattr(self, name)
            changes[name] = None if value is None else float(np.clip(value * scale, -2.0, 2.0))
        return replace(self, units="absolute", **changes)

    def min_size(self, n: int) -> int:
        """Smallest valid cluster of a landmark with ``n`` readable images."""
        return max(self.min_cluster_size, math.ceil(self.min_cluster_fraction * n - 1e-9))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LandmarkClusters:
    """One landmark's clustering.

    Attributes:
        labels: per row, its cluster ``0..K-1`` among *all* clusters found, numbered by
            decreasing size; the first ``num_valid`` clusters are the valid ones.
        sizes: sizes of all clusters, decreasing.
        min_size: the size a cluster needed to be valid.
        centroids: float32 ``[num_valid, d]`` unit-norm means of the valid clusters.
        own_similarity: per row, the best cosine similarity to a valid centroid (NaN if none).
        assignment: per row, the valid cluster it is kept in (its own, or the nearest one it was
            attached to), or -1.
        own_neighbours: with ``image_rule="evidence"``, per row the mean cosine similarity to its
            ``evidence_k`` nearest other rows of the landmark (-1 for a landmark of one image);
            else empty.
    """

    labels: np.ndarray
    sizes: np.ndarray
    min_size: int
    centroids: np.ndarray
    own_similarity: np.ndarray
    assignment: np.ndarray
    own_neighbours: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def num_valid(self) -> int:
        return len(self.centroids)

    @property
    def attached(self) -> np.ndarray:
        """Rows kept by ``attach_distance`` although their own cluster is too small."""
        return (self.assignment >= 0) & (self.labels >= self.num_valid)


def cluster_landmark(embeddings: np.ndarray, params: CleaningParams) -> LandmarkClusters:
    """Step 1 for one landmark: its rows (finite, non-zero) → valid clusters and their centroids."""
    x = np.asarray(embeddings, dtype=np.float64)
    n, d = x.shape
    if n == 0:
        raise ValueError("cluster_landmark: a landmark with no rows")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = agglomerative_clusters(unit, params.distance_threshold, params.linkage).astype(np.int32)
    sizes = np.bincount(labels)
    min_size = params.min_size(n)
    own_neighbours = _own_neighbours(unit, params.evidence_k) if params.image_rule == "evidence" else np.zeros(0, np.float32)
    k = int((sizes >= min_size).sum())  # clusters are numbered by decreasing size: valid ones first
    if k == 0:
        return LandmarkClusters(labels, sizes, min_size, np.zeros((0, d), np.float32),
                                np.full(n, np.nan, np.float32), np.full(n, -1, np.int32), own_neighbours)
    sums = np.zeros((k, d))
    inside = labels < k
    np.add.at(sums, labels[inside], unit[inside])
    centroids = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    similarity = unit @ centroids.T
    own = similarity.max(axis=1)
    assignment = np.where(inside, labels, -1).astype(np.int32)
    if params.attach_distance is not None:
        attach = ~inside & (1.0 - own <= params.attach_distance)
        assignment[attach] = similarity[attach].argmax(axis=1)
    return LandmarkClusters(labels, sizes, min_size, centroids.astype(np.float32), own.astype(np.float32), assignment,
                            own_neighbours)


def _mean_top(sims: np.ndarray, k: int) -> np.ndarray:
    """Row-wise mean of the ``k`` largest entries (``-inf`` entries excluded); -1 where none is left."""
    k = min(k, sims.shape[1])
    top = -np.sort(-sims, axis=1)[:, :k]
    finite = np.isfinite(top)
    count = finite.sum(axis=1)
    total = np.where(finite, top, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), -1.0).astype(np.float32)


def _own_neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    """Per row of one landmark, the mean similarity to its ``k`` nearest other rows (blocks of rows:
    memory stays ``block × class size``)."""
    n = len(unit)
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, 1024):
        sims = unit[s:s + 1024] @ unit.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf  # not its own neighbour
        out[s:s + len(sims)] = _mean_top(sims, k)
    return out


# ---- parallel step 1 ----------------------------------------------------------------------------

_WORKER_ROWS: np.ndarray | None = None


def _init_worker(path: str) -> None:
    global _WORKER_ROWS
    _WORKER_ROWS = np.load(path, mmap_mode="r", allow_pickle=False)


def _cluster_spans(spans: list[tuple[int, int]], params: CleaningParams) -> list[LandmarkClusters]:
    return [cluster_landmark(np.asarray(_WORKER_ROWS[a:b]), params) for a, b in spans]


def _cluster_all(embeddings: np.ndarray, groups: list[np.ndarray], params: CleaningParams, n_jobs: int,
                 progress: bool) -> list[LandmarkClusters]:
    """Step 1 for every landmark; ``groups[j]`` are landmark j's row numbers (non-empty)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(g) for g in groups), desc="clustering landmarks", unit="img", disable=not progress)
    if n_jobs <= 1 or len(groups) <= 1:
        out = []
        for rows in groups:
            out.append(cluster_landmark(embeddings[rows], params))
            bar.update(len(rows))
        bar.close()
        return out

    # Workers read the rows from a memory-mapped file, landmark by landmark in one contiguous
    # span each: nothing database-sized is pickled or held per worker, and a worker's memory is
    # that of the landmarks it is clustering.
    with tempfile.TemporaryDirectory(prefix="landmark-cleaning-") as tmp:
        path = os.path.join(tmp, "rows.npy")
        total = sum(len(g) for g in groups)
        rows_file = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, embeddings.shape[1]))
        spans, start = [], 0
        for rows in groups:
            rows_file[start:start + len(rows)] = embeddings[rows]
            spans.append((start, start + len(rows)))
            start += len(rows)
        rows_file.flush()
        del rows_file
        # Biggest landmarks first (their quadratic cost dominates; started late they would leave
        # one core busy alone at the end), then the tail batched into tasks of >= _TASK_ROWS rows.
        order = sorted(range(len(groups)), key=lambda j: -len(groups[j]))
        tasks: list[list[int]] = []
        current: list[int] = []
        size = 0
        for j in order:
            current.append(j)
            size += len(groups[j])
            if size >= _TASK_ROWS:
                tasks.append(current)
                current, size = [], 0
        if current:
            tasks.append(current)
        out: list[LandmarkClusters | None] = [None] * len(groups)
        # spawn, not fork: the caller may hold threads (torch, faiss/OpenMP) that fork would break.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(path,)) as pool:
            futures = [(task, pool.submit(_cluster_spans, [spans[j] for j in task], params)) for task in tasks]
            for task, future in futures:
                for j, result in zip(task, future.result()):
                    out[j] = result
                bar.update(sum(len(groups[j]) for j in task))
        bar.close()
        return out  # type: ignore[return-value]


# ---- FAISS helpers ------------------------------------------------------------------------------


def _index(vectors: np.ndarray, params: CleaningParams):
    from retrieval.index import build_index

    kind = params.index
    if kind == "auto":
        kind = "flat" if len(vectors) <= params.exact_index_limit else "ivf"
    return build_index(np.ascontiguousarray(vectors, dtype=np.float32), kind=kind)


def _unit32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _search_rows(index, embeddings: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` search for ``embeddings[rows]``, chunked so no database-sized copy is made."""
    from retrieval.index import search

    k = min(k, index.ntotal)
    scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    for s in range(0, len(rows), _QUERY_CHUNK):
        chunk = _unit32(embeddings[rows[s:s + _QUERY_CHUNK]])
        scores[s:s + len(chunk)], ids[s:s + len(chunk)] = search(index, chunk, k)
    return scores, ids


def _complete_groups(accepted_pairs: list[tuple[float, int, int]]) -> dict[int, int]:
    """Duplicate groups from the accepted pairs ``(distance, a, b)``, without chaining.

    Pairs are taken closest first; two groups merge only when *every* pair across them was
    accepted (complete linkage over the accepted-pair graph). A chain a~b, b~c with a≁c therefore
    never puts a and c under one id: b joins whichever of them is closer, the other stays apart.
    Returns each landmark that appears in an accepted pair → its group's root.
    """
    accepted = {(min(a, b), max(a, b)) for _, a, b in accepted_pairs}
    groups: dict[int, set[int]] = {}
    root_of: dict[int, int] = {}
    for _, a, b in sorted(accepted_pairs):
        for j in (a, b):
            if j not in root_of:
                root_of[j] = j
                groups[j] = {j}
        ra, rb = root_of[a], root_of[b]
        if ra == rb:
            continue
        if all((min(x, y), max(x, y)) in accepted for x in groups[ra] for y in groups[rb]):
            keep, gone = (ra, rb) if ra < rb else (rb, ra)
            groups[keep] |= groups.pop(gone)
            for j in groups[keep]:
                root_of[j] = keep
    return root_of


def _find_duplicates(index, centroids: np.ndarray, owner: np.ndarray, csize: np.ndarray, uniques: np.ndarray,
                     params: CleaningParams) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Step 2: each landmark's group (its canonical landmark's code) and the groups found.

    The returned groups carry their evidence: every pair of landmarks with at least one pair of
    coinciding clusters, with the shares of images involved, whether or not it was accepted.
    """
    from retrieval.index import search

    num_landmarks = len(uniques)
    k = min(params.neighbours + 1, index.ntotal)
    scores, hits = search(index, centroids, k)
    src = np.repeat(np.arange(len(centroids)), k)
    dst, sim = hits.ravel(), scores.ravel()
    ok = (dst >= 0) & (1.0 - sim <= params.duplicate_distance)
    src, dst, sim = src[ok], dst[ok], sim[ok]
    ok = owner[src] != owner[dst]
    src, dst, sim = src[ok], dst[ok], sim[ok]
    pairs: dict[tuple[int, int], list] = {}
    for c, h, s in zip(src.tolist(), dst.tolist(), sim.tolist()):
        a, b = owner[c], owner[h]
        if a > b:
            a, b, c, h = b, a, h, c
        entry = pairs.setdefault((int(a), int(b)), [set(), set(), 2.0])
        entry[0].add(c)
        entry[1].add(h)
        entry[2] = min(entry[2], 1.0 - s)
    clustered = np.bincount(owner, weights=csize, minlength=num_landmarks)
    evidence: list[dict] = []
    evidence_codes: list[tuple[int, int]] = []
    accepted_pairs: list[tuple[float, int, int]] = []
    for (a, b), (ca, cb, dist) in sorted(pairs.items()):
        evidence_codes.append((a, b))
        share_a = float(csize[sorted(ca)].sum() / clustered[a])
        share_b = float(csize[sorted(cb)].sum() / clustered[b])
        accepted = min(share_a, share_b) >= params.duplicate_min_share
        evidence.append({"landmarks": [str(uniques[a]), str(uniques[b])], "distance": round(float(dist), 4),
                         "shares": [round(share_a, 4), round(share_b, 4)], "duplicate": bool(accepted)})
        if accepted:
            accepted_pairs.append((float(dist), a, b))
    root_of = _complete_groups(accepted_pairs)
    for e, (a, b) in zip(evidence, evidence_codes):  # "duplicate" but not "merged": chaining refused
        e["merged"] = bool(e["duplicate"] and root_of[a] == root_of[b])
    components: dict[int, list[int]] = {}
    for j, root in sorted(root_of.items()):
        components.setdefault(root, []).append(j)
    components = {root: members for root, members in components.items() if len(members) > 1}
    group = np.arange(num_landmarks)
    groups: list[dict] = []
    for member_codes in components.values():
        order = {lid: i for i, lid in enumerate(_id_order([str(uniques[j]) for j in member_codes]))}
        # The group's id: its member with the most clustered images (ties: the first id).
        canonical = max(member_codes, key=lambda j: (clustered[j], -order[str(uniques[j])]))
        group[member_codes] = canonical
        names = {str(uniques[j]) for j in member_codes}
        groups.append({
            "landmark_id": str(uniques[canonical]),
            "members": sorted(names, key=order.get),
            "evidence": [e for e in evidence if e["merged"] and set(e["landmarks"]) <= names],
        })
    groups.sort(key=lambda g: g["landmark_id"])
    return group, groups, evidence


# ---- the embedding's scale and separability -----------------------------------------------------


def embedding_scale(embeddings: np.ndarray, codes: np.ndarray, valid: np.ndarray, seed: int = 0) -> float:
    """The median cosine distance between two images of *different* landmarks: the unit of
    ``units="relative"``.

    It measures how compressed an embedding is: an ImageNet backbone puts unrelated photos close
    together, a trained model spreads landmarks apart (about orthogonal: ~1.0). Unlike a
    within-landmark scale it does not depend on how many shooting angles the landmarks have or
    on how tight their clusters are. Measured on a seeded sample of ``_SCALE_PAIRS`` random pairs
    of readable rows with different ids; NaN when there are no such pairs.
    """
    rows = np.flatnonzero(valid)
    if len(rows) < 2 or len(np.unique(codes[rows])) < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    a = rows[rng.integers(len(rows), size=_SCALE_PAIRS)]
    b = rows[rng.integers(len(rows), size=_SCALE_PAIRS)]
    different = codes[a] != codes[b]
    a, b = a[different], b[different]
    if len(a) == 0:
        return math.nan
    ua, ub = _unit32(embeddings[a]), _unit32(embeddings[b])
    return float(np.median(1.0 - np.einsum("ij,ij->i", ua, ub)))


def label_agreement(embeddings: np.ndarray, codes: np.ndarray, valid: np.ndarray, params: CleaningParams,
                    seed: int = 0) -> float:
    """Share of readable images whose nearest other readable image carries the same landmark id.

    A label-free check of the model on the DB's own (noisy) labels: a model that separates the
    landmarks puts most images next to their own landmark (about 1 - noise share), one that does
    not puts them next to anything. Only images of landmarks with two or more readable images
    count; at most ``_AGREEMENT_QUERIES`` of them (seeded sample; fewer past 100k images, see
    ``_AGREEMENT_PRODUCTS``) are queried against the whole DB by exact search. An approximate
    index would need training on the whole DB for a handful of queries (at 1M images that was
    ~20 minutes of IVF k-means on 2 cores); exact search costs queries × DB. NaN when none count.
    """
    from retrieval.index import build_index, search

    rows = np.flatnonzero(valid)
    counts = np.bincount(codes[rows], minlength=int(codes.max()) + 1 if len(codes) else 0)
    queries = rows[counts[codes[rows]] >= 2]
    if len(queries) == 0:
        return math.nan
    sample = min(_AGREEMENT_QUERIES, max(_AGREEMENT_MIN_QUERIES, int(_AGREEMENT_PRODUCTS // len(rows))))
    if len(queries) > sample:
        queries = np.sort(np.random.default_rng(seed).choice(queries, sample, replace=False))
    index = build_index(_unit32(embeddings[rows]), kind="flat")
    agree = 0
    for s in range(0, len(queries), _QUERY_CHUNK):
        chunk = queries[s:s + _QUERY_CHUNK]
        _, hits = search(index, _unit32(embeddings[chunk]), 2)
        hit_rows = np.where(hits >= 0, rows[np.maximum(hits, 0)], -1)
        # The image itself is normally the first hit; exact duplicates may swap places with it.
        nearest = np.where(hit_rows[:, 0] == chunk, hit_rows[:, 1], hit_rows[:, 0])
        agree += int(((nearest >= 0) & (codes[np.maximum(nearest, 0)] == codes[chunk])).sum())
    return agree / len(queries)


# ---- the whole algorithm ------------------------------------------------------------------------


@dataclass
class CleaningResult:
    """Decisions for every input row, and what led to them.

    Row arrays have one entry per input row: ``keep``, ``reason`` (empty for kept rows; otherwise
    starts with a code of :data:`REASONS`), ``reason_code``, ``cluster`` (the row's valid cluster
    within its landmark, -1 if none), ``input_landmark_id`` (as given), ``landmark_id`` (the merged id when duplicates are merged),
    ``duplicate_of`` (the id of the group a duplicate landmark belongs to, else ''),
    ``other_landmark`` / ``other_similarity`` (the nearest other landmark's id and score, for
    images of valid clusters; under ``image_rule="evidence"`` the first other landmark among its
    nearest images and the mean similarity of its ``evidence_k`` nearest images of other landmarks), ``own_similarity``, ``nonlandmark_neighbour`` / ``nonlandmark_similarity``
    (row of the nearest non-landmark image, -1 if the step did not run).
    ``landmarks`` holds one dict per input landmark id; ``duplicate_groups`` the groups found;
    ``duplicate_pairs`` every pair of landmarks with coinciding clusters (accepted or not, and
    whether it was merged: a pair refused as a chain link is ``duplicate`` but not ``merged``).
    ``params`` are the absolute values applied, ``asked_params`` the ones given; ``scale`` and
    ``separability`` describe the embedding; ``applied`` is False when the model was too weak
    (then ``proposed`` holds the decisions it would have made).
    """

    params: CleaningParams
    keep: np.ndarray
    reason: np.ndarray
    reason_code: np.ndarray
    cluster: np.ndarray
    input_landmark_id: np.ndarray
    landmark_id: np.ndarray
    duplicate_of: np.ndarray
    own_similarity: np.ndarray
    other_landmark: np.ndarray
    other_similarity: np.ndarray
    nonlandmark_neighbour: np.ndarray
    nonlandmark_similarity: np.ndarray
    landmarks: dict[str, dict] = field(default_factory=dict)
    duplicate_groups: list[dict] = field(default_factory=list)
    duplicate_pairs: list[dict] = field(default_factory=list)
    clusters: dict[str, LandmarkClusters] = field(default_factory=dict, repr=False)
    asked_params: CleaningParams | None = None  # as given (``params`` holds the absolute values used)
    scale: float = math.nan  # embedding_scale of the embedding
    separability: dict = field(default_factory=dict)  # label_agreement, floor, weak
    applied: bool = True  # False: the model was too weak; ``proposed`` holds its decisions
    proposed: "CleaningResult | None" = field(default=None, repr=False)

    def counts(self) -> dict:
        codes, n = np.unique(self.reason_code[~self.keep], return_counts=True)
        return {
            "rows": int(len(self.keep)),
            "kept": int(self.keep.sum()),
            "removed": int((~self.keep).sum()),
            "removed_by_reason": {str(c): int(k) for c, k in zip(codes, n)},
            "landmarks": len(self.landmarks),
            "landmarks_kept": sum(1 for v in self.landmarks.values() if not v["dropped"]),
            "landmarks_dropped": sum(1 for v in self.landmarks.values() if v["dropped"]),
            # Kept landmarks counting each duplicate group once (whether merged or flagged).
            "distinct_landmarks_kept": len({self.duplicate_of[i] or self.input_landmark_id[i]
                                            for i in np.flatnonzero(self.keep)}),
            "duplicate_groups": len(self.duplicate_groups),
            "valid_clusters": int(sum(v["valid_clusters"] for v in self.landmarks.values())),
        }


def _pool_index(nonlandmark_embeddings: np.ndarray, d: int, params: CleaningParams):
    """FAISS index over the usable rows of the non-landmark pool, and those rows (None if none)."""
    pool = np.asarray(nonlandmark_embeddings)
    if pool.ndim != 2 or pool.shape[1] != d:
        raise ValueError(f"non-landmark embeddings have shape {pool.shape}; expected [m, {d}] like the database")
    _, pool_valid = _check_inputs(pool, ["-"] * len(pool), None, what="non-landmark embeddings")
    pool_rows = np.flatnonzero(pool_valid)
    if len(pool_rows) == 0:
        return None, pool_rows
    return _index(_unit32(pool[pool_rows]), params), pool_rows


def _evidence_step(embeddings, valid, codes, group, uniques, own_knn, nonlandmark_embeddings, params,
                   keep, reason_code, reason, other_landmark, other_sim, nl_neighbour, nl_sim) -> None:
    """``image_rule="evidence"``: remove kept images whose evidence reaches the threshold (in place).

    The index over all readable images is database-sized (FAISS keeps its own float32 copy);
    everything else is per chunk of ``_QUERY_CHUNK`` images. With an exact index the "other" side
    is never understated; an approximate one (IVF/HNSW, ``index="auto"`` beyond
    ``exact_index_limit`` images) may miss neighbours, like any approximate search.
    """
    d = embeddings.shape[1]
    image_rows = np.flatnonzero(valid)
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        return
    k = params.evidence_k
    index = _index(_unit32(embeddings[image_rows]), params)
    pool_index, pool_rows = (None, None) if nonlandmark_embeddings is None else _pool_index(nonlandmark_embeddings, d, params)
    for s in range(0, len(rows), _QUERY_CHUNK):
        chunk = rows[s:s + _QUERY_CHUNK]
        # +1: the image finds itself (same group, so never on the "other" side)
        scores, hits = _search_rows(index, embeddings, chunk, params.evidence_search + 1)
        # FAISS pads missing results with id -1 and a finite score (-FLT_MAX): mask by id, not score.
        found = hits >= 0
        hit_rows = np.where(found, image_rows[np.maximum(hits, 0)], -1)
        same_group = group[codes[np.maximum(hit_rows, 0)]] == group[codes[chunk]][:, None]
        other = found & ~same_group
        top = -np.sort(-np.where(other, scores, -np.inf), axis=1)[:, :k]
        # Fewer than k other-landmark images among those retrieved: the missing ones are at most as
        # similar as the last image retrieved, which is what they count as (an upper bound).
        floor = np.where(found, scores, np.inf).min(axis=1)
        floor = np.where(np.isfinite(floor), floor, -1.0)
        other_k = np.where(np.isfinite(top), top, floor[:, None]).mean(axis=1).astype(np.float32)
        # The own side covers the whole duplicate group: the images of a duplicate partner (same
        # group, other id) count as its own. max(own landmark's top-k, partner's top-k when k of
        # them were retrieved) never exceeds the top-k of the group as a whole, so this never
        # overstates the own side; for landmarks without a duplicate it is exactly own_knn.
        partner = found & same_group & (codes[np.maximum(hit_rows, 0)] != codes[chunk][:, None])
        partner_k = np.where(partner.sum(axis=1) >= k, _mean_top(np.where(partner, scores, -np.inf), k), -1.0)
        own = np.fmax(own_knn[chunk], partner_k).astype(np.float32)
        has_other = other.any(axis=1)
        nearest_other = hit_rows[np.arange(len(chunk)), np.argmax(other, axis=1)]
        other_landmark[chunk[has_other]] = uniques[codes[nearest_other[has_other]]]
        other_sim[chunk] = other_k

        pool_1 = np.full(len(chunk), -1.0, dtype=np.float32)
        if pool_index is not None:
            p_scores, p_hits = _search_rows(pool_index, embeddings, chunk, 1)
            hit = p_hits[:, 0] >= 0
            pool_1[hit] = p_scores[hit, 0]
            nl_sim[chunk[hit]] = p_scores[hit, 0]
            nl_neighbour[chunk[hit]] = pool_rows[p_hits[hit, 0]]
        evidence = np.maximum(other_k, pool_1) - own
        noise = evidence >= params.evidence_threshold
        for r, e, o, s_other, s_pool in zip(chunk[noise], evidence[noise], own[noise], other_k[noise], pool_1[noise]):
            keep[r] = False
            reason_code[r] = "neighbour_evidence"
            if s_pool > s_other:
                closer = f"non-landmark image {nl_neighbour[r]} ({s_pool:.3f})"
            elif other_landmark[r]:
                closer = f"its nearest images of other landmarks, first {other_landmark[r]} ({s_other:.3f})"
            else:
                closer = (f"other landmarks' images, none among its {params.evidence_search} nearest "
                          f"(bound {s_other:.3f})")
            reason[r] = (f"neighbour_evidence: {e:.3f} >= {params.evidence_threshold}: {closer} "
                         f"vs its own landmark's nearest images ({o:.3f})")


def _check_inputs(embeddings: np.ndarray, landmark_ids: Sequence[str], valid: np.ndarray | None,
                  what: str = "embeddings") -> tuple[np.ndarray, np.ndarray]:
    if embeddings.ndim != 2 or embeddings.shape[1] == 0:
        raise ValueError(f"{what}: expected a 2-D array [rows, dim], got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"{what}: expected floating point values, got dtype {embeddings.dtype}")
    n = len(embeddings)
    if len(landmark_ids) != n:
        raise ValueError(f"{what} has {n} rows but there are {len(landmark_ids)} landmark ids; they must match row for row")
    if n == 0:
        raise ValueError(f"{what}: no rows to clean")
    ids = np.asarray([str(i) for i in landmark_ids], dtype=object)
    empty = np.flatnonzero([not i.strip() for i in ids])
    if len(empty):
        raise ValueError(f"row {empty[0]}: empty landmark id ({len(empty)} rows); every row needs its landmark's id")
    if valid is None:
        valid = np.ones(n, dtype=bool)
    else:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (n,):
            raise ValueError(f"valid has shape {valid.shape}, expected ({n},)")
    valid = valid.copy()
    for s in range(0, n, _QUERY_CHUNK):  # chunked: no database-sized temporaries
        block = np.asarray(embeddings[s:s + _QUERY_CHUNK], dtype=np.float64)
        sq = np.einsum("ij,ij->i", block, block)
        bad = ~np.isfinite(sq) & valid[s:s + len(block)]
        if bad.any():
            rows = s + np.flatnonzero(bad)
            raise ValueError(f"{what}: row {rows[0]} has NaN or inf values ({len(rows)} such rows from row {s} on); "
                             "unreadable images must have valid=False (or an all-zero row), never NaN")
        # Normalised in float32, such a row's squared norm becomes inf and the row all zeros.
        huge = (sq > _FLOAT32_MAX) & valid[s:s + len(block)]
        if huge.any():
            rows = s + np.flatnonzero(huge)
            raise ValueError(f"{what}: row {rows[0]} has a norm of {math.sqrt(sq[rows[0] - s]):.3g}, too large to "
                             f"normalise in float32 ({len(rows)} such rows from row {s} on); scale the embeddings down")
        valid[s:s + len(block)] &= sq > _ZERO_NORM
    return ids, valid


def _id_order(ids: Sequence[str]) -> list[str]:
    from datamodules.manifest import ClassMap

    return list(ClassMap.from_ids(ids).landmark_ids)


def clean_embeddings(
    embeddings: np.ndarray,
    landmark_ids: Sequence[str],
    params: CleaningParams | None = None,
    *,
    valid: np.ndarray | None = None,
    nonlandmark_embeddings: np.ndarray | None = None,
    repeated: np.ndarray | None = None,
    n_jobs: int = 1,
    progress: bool = False,
    force: bool = False,
) -> CleaningResult:
    """Decide keep/remove for every row of a landmark database.

    Args:
        embeddings: ``[n, d]`` float rows (any norm; they are L2-normalised here). May be a
            read-only memory map: it is read in chunks and per landmark, never copied whole.
        landmark_ids: the landmark id of each row (text).
        params: the algorithm's constants (:class:`CleaningParams`).
        valid: False for rows without an embedding (unreadable images); all-zero rows count as
            invalid too. Invalid rows are removed with reason ``unreadable``.
        nonlandmark_embeddings: ``[m, d]`` embeddings of a non-landmark pool (all-zero rows are
            skipped) for step 4.
        repeated: True for rows that repeat an earlier row's photo under the same landmark
            (:func:`datamodules.manifest.repeated_rows`). They are removed (``repeated_row``) and
            left out of everything measured or clustered, whatever the model: a thousand copies
            of one photo would otherwise agree with each other and pass a weak model as a
            strong one.
        n_jobs: worker processes for the per-landmark clustering (1 = in this process).
        progress: tqdm bars.
        force: apply the decisions even when the model is too weak to clean with (its
            :func:`label_agreement` is below ``params.min_separability``); otherwise such a
            result keeps every readable row and holds the decisions in ``proposed``.

    Raises:
        ValueError: shapes or counts that do not match, empty ids, NaN/inf in a valid row,
            bad parameters; the message names the row.
    """
    asked = params or CleaningParams()
    ids, valid = _check_inputs(embeddings, landmark_ids, valid)
    if repeated is not None:
        repeated = np.asarray(repeated, dtype=bool)
        if repeated.shape != valid.shape:
            raise ValueError(f"repeated has shape {repeated.shape}, expected {valid.shape}")
        valid &= ~repeated  # out of the scale, the agreement and every step, like an unreadable row
    if not valid.any():
        # Removing every row as unreadable would empty the DB; the embeddings are at fault.
        raise ValueError("embeddings: no readable rows: every row is all-zero (no embedding) or unreadable; "
                         "nothing to clean with")
    by = _group_by_landmark(ids, valid)
    state = _RowState.start(valid, repeated)
    log.info("cleaning %d rows of %d landmarks (%d unreadable)", len(ids), len(by.uniques), int((~valid).sum()))
    scale = embedding_scale(embeddings, by.codes, valid)
    agreement = label_agreement(embeddings, by.codes, valid, asked)
    if asked.units == "relative" and not math.isfinite(scale):
        raise ValueError("relative units (the default) need the embedding's scale, measured on readable images of "
                         "two landmarks; give absolute parameters (units='absolute')")
    params = asked.resolved(scale)
    log.info("embedding scale (median cosine distance between landmarks) %.4f; nearest-neighbour label agreement %.3f",
             scale, agreement)

    per_landmark = _cluster_landmarks(embeddings, by, params, n_jobs, progress)  # step 1
    landmarks, table = _apply_clusters(by, per_landmark, params, state)
    group = np.arange(len(by.uniques))  # each landmark's duplicate group (its canonical landmark)
    duplicate_groups: list[dict] = []
    duplicate_pairs: list[dict] = []
    if table is not None:
        index, group, duplicate_groups, duplicate_pairs = _find_duplicate_landmarks(table, by, params)  # step 2
        if params.image_rule == "clusters" and params.reassign_margin is not None:
            _remove_closer_to_other_landmarks(index, embeddings, table, group, by, params, state)  # step 3
    if nonlandmark_embeddings is not None and params.image_rule == "clusters" and (
            params.nonlandmark_distance is not None or params.nonlandmark_margin is not None):
        _remove_near_nonlandmarks(embeddings, nonlandmark_embeddings, params, state)  # step 4
    if params.image_rule == "evidence":
        tick = time.perf_counter()
        _evidence_step(embeddings, valid, by.codes, group, by.uniques, state.own_knn, nonlandmark_embeddings, params,
                       state.keep, state.reason_code, state.reason, state.other_landmark, state.other_sim,
                       state.nl_neighbour, state.nl_sim)
        log.info("evidence rule (image neighbours): %.1f s", time.perf_counter() - tick)
    result = _result(params, ids, by, group, state, landmarks, duplicate_groups, duplicate_pairs, per_landmark)
    result.asked_params, result.scale = asked, scale
    # An undefined agreement (no landmark has two readable photos) is no evidence that the model
    # separates anything: weak, so a DB of one photo per landmark is not emptied unchecked.
    result.separability = {"label_agreement": None if math.isnan(agreement) else round(agreement, 4),
                           "floor": asked.min_separability,
                           "weak": bool(not math.isfinite(agreement) or agreement < asked.min_separability)}
    if result.separability["weak"] and not force:
        return _withheld(result, valid)
    return result


def _withheld(proposed: CleaningResult, valid: np.ndarray) -> CleaningResult:
    """What a too-weak model's cleaning applies: nothing but the removal of unreadable and repeated
    rows (the decisions it would have made stay in ``proposed``)."""
    n = len(valid)
    reason_code = np.where(valid, "", proposed.reason_code).astype(object)
    reason = np.where(valid, "", proposed.reason).astype(object)
    landmarks = {lid: {**info, "kept": info["readable"], "dropped": False, "duplicate_of": ""}
                 for lid, info in proposed.landmarks.items()}
    return replace(
        proposed, keep=valid.copy(), reason=reason, reason_code=reason_code,
        cluster=np.where(valid, proposed.cluster, -1).astype(np.int32),
        landmark_id=proposed.input_landmark_id.copy(), duplicate_of=np.full(n, "", dtype=object),
        landmarks=landmarks, duplicate_groups=[], applied=False, proposed=proposed,
    )


# ---- the steps of clean_embeddings --------------------------------------------------------------


@dataclass
class _RowState:
    """Every row's decision and evidence so far, filled in step by step (one entry per input row)."""

    keep: np.ndarray
    reason_code: np.ndarray
    reason: np.ndarray
    cluster: np.ndarray
    own_sim: np.ndarray
    own_knn: np.ndarray
    other_landmark: np.ndarray
    other_sim: np.ndarray
    nl_neighbour: np.ndarray
    nl_sim: np.ndarray

    @classmethod
    def start(cls, valid: np.ndarray, repeated: np.ndarray | None = None) -> "_RowState":
        """Readable rows kept, unreadable (``unreadable``) and repeated (``repeated_row``) ones
        removed, no evidence yet."""
        n = len(valid)
        state = cls(
            keep=valid.copy(), reason_code=np.full(n, "", dtype=object), reason=np.full(n, "", dtype=object),
            cluster=np.full(n, -1, dtype=np.int32), own_sim=np.full(n, np.nan, dtype=np.float32),
            own_knn=np.full(n, np.nan, dtype=np.float32), other_landmark=np.full(n, "", dtype=object),
            other_sim=np.full(n, np.nan, dtype=np.float32), nl_neighbour=np.full(n, -1, dtype=np.int64),
            nl_sim=np.full(n, np.nan, dtype=np.float32),
        )
        state.reason_code[~valid] = "unreadable"
        state.reason[~valid] = "unreadable: the image could not be decoded (no embedding)"
        if repeated is not None:
            state.reason_code[repeated] = "repeated_row"
            state.reason[repeated] = "repeated_row: repeats an earlier row's path and landmark_id"
        return state


@dataclass
class _ByLandmark:
    """The rows grouped by landmark: landmark ``j`` has id ``uniques[j]``; row ``i`` is of landmark ``codes[i]``."""

    uniques: np.ndarray
    codes: np.ndarray
    members: list[np.ndarray]  # landmark j's rows
    readable: list[np.ndarray]  # ... those with an embedding


@dataclass
class _CentroidTable:
    """The valid clusters of all landmarks, for steps 2 and 3: unit centroid, landmark, size."""

    centroids: np.ndarray
    owner: np.ndarray
    size: np.ndarray


def _group_by_landmark(ids: np.ndarray, valid: np.ndarray) -> _ByLandmark:
    uniques, codes = np.unique(ids.astype(str), return_inverse=True)
    num_landmarks = len(uniques)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(num_landmarks + 1))
    members = [order[bounds[j]:bounds[j + 1]] for j in range(num_landmarks)]
    readable = [rows[valid[rows]] for rows in members]
    return _ByLandmark(uniques.astype(object), codes, members, readable)


def _cluster_landmarks(embeddings: np.ndarray, by: _ByLandmark, params: CleaningParams, n_jobs: int,
                       progress: bool) -> dict[int, LandmarkClusters]:
    """Step 1 for every landmark with a readable row (landmark index → its clustering)."""
    todo = [j for j in range(len(by.uniques)) if len(by.readable[j])]
    tick = time.perf_counter()
    results = _cluster_all(embeddings, [by.readable[j] for j in todo], params, n_jobs, progress)
    log.info("step 1 (per-landmark clustering, %d jobs): %.1f s", n_jobs, time.perf_counter() - tick)
    return dict(zip(todo, results))


def _apply_clusters(by: _ByLandmark, per_landmark: dict[int, LandmarkClusters], params: CleaningParams,
                    state: _RowState) -> tuple[dict[str, dict], _CentroidTable | None]:
    """Step 1's decisions (dropped landmarks, small clusters), each landmark's summary, and the
    table of valid centroids for steps 2 and 3 (None when no landmark has a valid cluster)."""
    centroid_blocks, centroid_owner, centroid_size = [], [], []
    landmarks: dict[str, dict] = {}
    for j in range(len(by.uniques)):
        rows = by.readable[j]
        res = per_landmark.get(j)
        info = {"images": int(len(by.members[j])), "readable": int(len(rows)), "valid_clusters": 0,
                "cluster_sizes": [], "small_clusters": [], "min_cluster_size": None, "dropped": True}
        landmarks[str(by.uniques[j])] = info
        if res is None:  # nothing readable: its rows are already removed as unreadable
            continue
        info.update(cluster_sizes=[int(s) for s in res.sizes[:res.num_valid]],
                    small_clusters=[int(s) for s in res.sizes[res.num_valid:]],
                    min_cluster_size=int(res.min_size), valid_clusters=res.num_valid, dropped=res.num_valid == 0)
        state.cluster[rows] = res.assignment
        state.own_sim[rows] = res.own_similarity
        if params.image_rule == "evidence":
            state.own_knn[rows] = res.own_neighbours
        if res.num_valid == 0:
            state.keep[rows] = False
            state.reason_code[rows] = "landmark_dropped"
            state.reason[rows] = (f"landmark_dropped: no cluster of >= {res.min_size} images "
                                  f"(largest {int(res.sizes.max())} of {len(rows)})")
            continue
        if params.image_rule == "clusters":
            _remove_small_clusters(rows, res, params, state)
        centroid_blocks.append(res.centroids)
        centroid_owner.extend([j] * res.num_valid)
        centroid_size.extend(int(s) for s in res.sizes[:res.num_valid])
    if not centroid_blocks:
        return landmarks, None
    return landmarks, _CentroidTable(np.concatenate(centroid_blocks), np.asarray(centroid_owner, dtype=np.int64),
                                     np.asarray(centroid_size, dtype=np.int64))


def _remove_small_clusters(rows: np.ndarray, res: LandmarkClusters, params: CleaningParams, state: _RowState) -> None:
    """``image_rule="clusters"``: a landmark's rows outside its valid clusters (not attached) are noise."""
    is_small = res.assignment < 0
    small = rows[is_small]
    if not len(small):
        return
    sizes_of = res.sizes[res.labels[is_small]]
    state.keep[small] = False
    state.reason_code[small] = "small_cluster"
    state.reason[small] = [f"small_cluster: in a cluster of {int(s)} < {res.min_size} images"
                           + ("" if params.attach_distance is None else
                              f", {1.0 - o:.3f} from the nearest kept cluster's centre (> {params.attach_distance})")
                           for s, o in zip(sizes_of, res.own_similarity[is_small])]


def _find_duplicate_landmarks(table: _CentroidTable, by: _ByLandmark,
                              params: CleaningParams) -> tuple[object, np.ndarray, list[dict], list[dict]]:
    """Step 2: the FAISS index over the valid centroids, each landmark's group, the groups and pairs."""
    tick = time.perf_counter()
    index = _index(table.centroids, params)
    group, duplicate_groups, duplicate_pairs = _find_duplicates(index, table.centroids, table.owner, table.size,
                                                                by.uniques, params)
    log.info("step 2 (index of %d centroids, duplicates): %.1f s", len(table.centroids), time.perf_counter() - tick)
    return index, group, duplicate_groups, duplicate_pairs


def _remove_closer_to_other_landmarks(index, embeddings: np.ndarray, table: _CentroidTable, group: np.ndarray,
                                      by: _ByLandmark, params: CleaningParams, state: _RowState) -> None:
    """Step 3: kept images closer to another landmark (another group) than to their own, by the margin.

    One FAISS query per kept image, the costliest step at scale, so it is skipped when disabled.
    Similarities are <= 1, so an image already within ``reassign_margin`` of 1 of its own centroid
    can never be closer to another landmark by the margin: only the others are searched (exact
    pruning; their other_landmark columns stay empty).
    """
    tick = time.perf_counter()
    owner, uniques = table.owner, by.uniques
    rows = np.flatnonzero(state.keep & ~(state.own_sim >= 1.0 - params.reassign_margin))
    scores, hits = _search_rows(index, embeddings, rows, params.neighbours)
    hit_group = np.where(hits >= 0, group[owner[np.maximum(hits, 0)]], -1)
    own_group = group[by.codes[rows]][:, None]
    same = hit_group == own_group
    other = (hit_group >= 0) & ~same
    best_same = np.where(same, scores, -np.inf).max(axis=1)
    own_best = np.fmax(state.own_sim[rows], best_same)
    first_other = np.argmax(other, axis=1)
    has_other = other.any(axis=1)
    best_other = np.where(has_other, scores[np.arange(len(rows)), first_other], -np.inf)
    other_owner = owner[np.maximum(hits[np.arange(len(rows)), first_other], 0)]
    state.other_landmark[rows[has_other]] = uniques[other_owner[has_other]]
    state.other_sim[rows[has_other]] = best_other[has_other]
    state.own_sim[rows] = own_best
    moved = has_other & (best_other > own_best + params.reassign_margin)
    for r, o, s_other, s_own in zip(rows[moved], other_owner[moved], best_other[moved], own_best[moved]):
        state.keep[r] = False
        state.reason_code[r] = "other_landmark"
        state.reason[r] = (f"other_landmark: closer to landmark {uniques[o]} ({s_other:.3f}) "
                           f"than to its own clusters ({s_own:.3f})")
    log.info("step 3 (images closer to another landmark): %.1f s", time.perf_counter() - tick)


def _remove_near_nonlandmarks(embeddings: np.ndarray, nonlandmark_embeddings: np.ndarray, params: CleaningParams,
                              state: _RowState) -> None:
    """Step 4: kept images within ``nonlandmark_distance`` of a non-landmark image, or more similar
    to it than to their landmark's nearest centroid by more than ``nonlandmark_margin``."""
    index, pool_rows = _pool_index(nonlandmark_embeddings, embeddings.shape[1], params)
    if index is None:
        log.warning("non-landmark pool has no usable embedding; step 4 skipped")
        return
    own_sim, nl_sim, nl_neighbour = state.own_sim, state.nl_sim, state.nl_neighbour
    rows = np.flatnonzero(state.keep)
    if params.nonlandmark_distance is None:  # the margin test alone: prune as in step 3
        rows = rows[~(own_sim[rows] >= 1.0 - params.nonlandmark_margin)]
    scores, hits = _search_rows(index, embeddings, rows, 1)
    nl_sim[rows] = scores[:, 0]
    nl_neighbour[rows] = np.where(hits[:, 0] >= 0, pool_rows[np.maximum(hits[:, 0], 0)], -1)
    found = hits[:, 0] >= 0
    near = np.zeros(len(rows), dtype=bool)
    if params.nonlandmark_distance is not None:
        near |= found & (1.0 - scores[:, 0] <= params.nonlandmark_distance)
    if params.nonlandmark_margin is not None:
        near |= found & (scores[:, 0] > own_sim[rows] + params.nonlandmark_margin)
    for r in rows[near]:
        state.keep[r] = False
        state.reason_code[r] = "near_nonlandmark"
        state.reason[r] = (f"near_nonlandmark: cosine distance {1.0 - nl_sim[r]:.3f} to non-landmark image "
                           f"{nl_neighbour[r]}, {1.0 - own_sim[r]:.3f} to its landmark's nearest kept cluster")


def _result(params: CleaningParams, ids: np.ndarray, by: _ByLandmark, group: np.ndarray, state: _RowState,
            landmarks: dict[str, dict], duplicate_groups: list[dict], duplicate_pairs: list[dict],
            per_landmark: dict[int, LandmarkClusters]) -> CleaningResult:
    """The final ids (merged or not), each row's duplicate group, and the kept count per landmark."""
    uniques, codes = by.uniques, by.codes
    num_landmarks = len(uniques)
    new_ids = uniques[group][codes].astype(object)
    duplicate_of = np.full(len(ids), "", dtype=object)
    grouped = group != np.arange(num_landmarks)
    members_of_groups = grouped[codes] | np.isin(codes, group[grouped])
    duplicate_of[members_of_groups] = new_ids[members_of_groups]
    final_ids = new_ids if params.duplicates == "merge" else ids.copy()
    in_group = grouped | np.isin(np.arange(num_landmarks), group[grouped])
    for j in range(num_landmarks):
        lid = str(uniques[j])
        landmarks[lid]["kept"] = int(state.keep[by.members[j]].sum())
        landmarks[lid]["duplicate_of"] = str(uniques[group[j]]) if in_group[j] else ""
    return CleaningResult(
        params=params, keep=state.keep, reason=state.reason, reason_code=state.reason_code, cluster=state.cluster,
        input_landmark_id=ids, landmark_id=final_ids, duplicate_of=duplicate_of, own_similarity=state.own_sim,
        other_landmark=state.other_landmark, other_similarity=state.other_sim,
        nonlandmark_neighbour=state.nl_neighbour, nonlandmark_similarity=state.nl_sim,
        landmarks=landmarks, duplicate_groups=duplicate_groups, duplicate_pairs=duplicate_pairs,
        clusters={str(uniques[j]): r for j, r in per_landmark.items()},
    )
