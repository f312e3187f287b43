"""FAISS inner-product indexes over L2-normalised embeddings, and memory-bounded search.

All indexes use the inner product, which equals cosine similarity because every row is checked to
be unit-norm; the scores returned by :func:`search` are therefore cosine similarities in [-1, 1],
the quantity that recognition thresholds are expressed in.

Three kinds are offered:

* ``"flat"`` -- exact, brute force (BLAS). The reference; use it for evaluation whenever it fits.
* ``"ivf"``  -- inverted file (k-means coarse quantiser, ``nprobe`` lists scanned per query).
  Approximate; pays a k-means training cost, so it only wins when queries are many.
* ``"hnsw"`` -- graph index. Approximate; slow to build, fast to query.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

__all__ = ["INDEX_KINDS", "build_index", "search", "search_chunk_size", "validate_embeddings"]

INDEX_KINDS = ("flat", "ivf", "hnsw")

#: Tolerance on | ||x||_2 - 1 | for a row to count as L2-normalised. float32 normalisation leaves
#: errors ~1e-7; 1e-3 still catches the real bug (a model head that forgot to normalise).
NORM_TOLERANCE = 1e-3

#: faiss warns below this many training points per IVF list (k-means gets unstable).
_MIN_POINTS_PER_LIST = 39

_BYTES_PER_RESULT = 4 + 8  # float32 score + int64 id


def validate_embeddings(x: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 2-D array of unit-norm rows, or raise ValueError.

    No copy is made when ``x`` already is float32 and C-contiguous (the common case), which matters
    for a multi-GB gallery. NaN/inf detection rides on the squared-norm pass: any non-finite
    element makes its row's squared norm non-finite, so no extra full-size boolean mask is needed.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero dimensions (shape {x.shape})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        return x
    sq_norms = np.einsum("ij,ij->i", x, x)
    bad = ~np.isfinite(sq_norms)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name} contains NaN or inf values in {rows.size} row(s), e.g. rows {rows[:5].tolist()}"
        )
    off = np.abs(np.sqrt(sq_norms) - 1.0) > NORM_TOLERANCE
    if off.any():
        rows = np.flatnonzero(off)
        raise ValueError(
            f"{name} rows must be L2-normalised (|norm - 1| <= {NORM_TOLERANCE}); "
            f"{rows.size} row(s) are not, e.g. row {rows[0]} has norm {math.sqrt(sq_norms[rows[0]]):.6g}"
        )
    return x


def build_index(
    embeddings: np.ndarray,
    kind: str = "flat",
    nlist: int | None = None,
    hnsw_m: int = 32,
    nprobe: int = 16,
    ef_search: int = 128,
    seed: int = 1234,
    max_train_points_per_list: int = 64,
) -> faiss.Index:
    """Build an inner-product FAISS index over L2-normalised ``embeddings`` ([n, d] float32).

    Args:
        embeddings: gallery rows, unit L2 norm (checked, tolerance :data:`NORM_TOLERANCE`).
        kind: ``"flat"`` (exact), ``"ivf"`` (IndexIVFFlat) or ``"hnsw"`` (IndexHNSWFlat).
        nlist: IVF lists. Default ``round(4 * sqrt(n))`` (faiss' rule of thumb), clipped so that
            k-means has at least 39 training points per list; an explicit value must be <= n.
        hnsw_m: HNSW graph degree.
        nprobe: IVF lists scanned per query (clipped to ``nlist``).
        ef_search: HNSW search beam width (raised to at least the ``k`` of each search by faiss).
        seed: k-means seed for IVF training, so that an evaluation is reproducible.
        max_train_points_per_list: IVF k-means runs on a random sample of at most this many
            gallery points per list. k-means costs points x nlist x iterations, which for a
            one-off evaluation index can exceed the whole search; 64 is ample for a coarse
            quantiser (faiss suggests 39..256 and defaults to 256, ~4x slower to train).

    Raises:
        ValueError: unknown ``kind``, non-2-D or empty input, NaN/inf, rows not unit-norm,
            bad ``nlist``.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    x = validate_embeddings(embeddings, "gallery embeddings")
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot build an index over an empty gallery")

    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        if nlist is None:
            nlist = int(round(4 * math.sqrt(n)))
            nlist = max(1, min(nlist, n // _MIN_POINTS_PER_LIST))
        elif not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, n={n}], got {nlist}")
        # The quantiser must use the same metric, otherwise lists are assigned by L2 while the
        # scan ranks by inner product (harmless for unit vectors, but confusing to reason about).
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.max_points_per_centroid = max(_MIN_POINTS_PER_LIST, max_train_points_per_list)
        # Hide faiss' "please provide at least 39*k training points" warning for tiny galleries
        # where the clipped nlist is 1: one centroid needs no k-means.
        index.cp.min_points_per_centroid = min(index.cp.min_points_per_centroid, n)
        index.train(x)
        index.nprobe = max(1, min(nprobe, nlist))
        # (faiss' Python wrapper keeps `quantizer` alive via index.referenced_objects.)
    else:  # hnsw
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    index.add(x)
    return index


def _per_query_bytes(index: faiss.Index, k: int) -> int:
    """Upper bound on the memory one query costs during a faiss search (see :func:`search`)."""
    # Output buffers (score + id per result) plus an equally sized allowance for faiss' own
    # per-query heaps / reservoirs (the reservoir used for k > 100 keeps up to 2k candidates).
    per_query = 2 * _BYTES_PER_RESULT * k
    bs_y = int(faiss.cvar.distance_compute_blas_database_bs)
    ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexFlat) else None
    if isinstance(index, faiss.IndexFlat):
        # One row of the inner-product tile faiss multiplies with BLAS (see search()).
        per_query += 4 * min(index.ntotal, bs_y)
    elif ivf is not None:
        # Coarse search = a flat search over the nlist centroids, then nprobe list ids/scores.
        per_query += 4 * min(ivf.nlist, bs_y) + _BYTES_PER_RESULT * ivf.nprobe
    elif hasattr(index, "hnsw"):
        # Candidate and result heaps of width efSearch.
        per_query += 2 * _BYTES_PER_RESULT * max(int(index.hnsw.efSearch), k)
    else:
        # Unknown index type: assume the worst, a full row of gallery scores per query.
        per_query += 4 * index.ntotal
    return per_query


def search_chunk_size(index: faiss.Index, k: int, memory_budget_mb: float = 256) -> int:
    """Number of queries per faiss call so that per-call buffers stay within ``memory_budget_mb``."""
    if memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    budget = int(memory_budget_mb * 2**20)
    return max(1, budget // _per_query_bytes(index, k))


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    memory_budget_mb: float = 256,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product search in chunks that keep per-call buffers within a memory budget.

    Returns ``(scores, ids)``: float32 ``[n, k]`` cosine similarities, descending per row, and int64
    ``[n, k]`` gallery row ids. ``k`` is clipped to the gallery size. Approximate indexes may
    return fewer than ``k`` hits for a query; faiss pads those slots with id ``-1`` and score
    ``-inf`` (for inner product), and callers must treat id ``-1`` as "no neighbour".

    Memory estimate. The naive model of an exact search is that faiss materialises a
    ``chunk x n_gallery`` block of inner products, i.e. ``chunk ~ budget / (4 B x n_gallery)``.
    faiss (>= 1.7, including the pinned 1.15) does better: it multiplies in tiles of at most
    ``distance_compute_blas_query_bs x distance_compute_blas_database_bs`` (4096 x 1024 floats =
    16 MiB) and folds each tile into per-query top-k heaps, so one query costs
    ``4 B x min(n_gallery, 1024)`` of tile plus its results. We budget per query
    ``2 x 12 B x k`` (outputs + faiss' heaps) + that tile row (flat), or the centroid tile row and
    ``nprobe`` coarse results (IVF), or ``efSearch``-wide heaps (HNSW); unknown index types fall
    back to the naive full-row model. ``chunk = budget // per_query``. Using the naive model
    would shrink chunks ~100x for a 100k gallery and, for d = 512 and galleries >~ 1M, push
    chunks below faiss' BLAS threshold (``nx * d < 128000``) onto its much slower per-query path.
    The returned arrays themselves (``n x k x 12 B``) are outside the budget: they are the result.

    Args:
        index: a trained faiss index (e.g. from :func:`build_index`).
        queries: [n, d] L2-normalised rows (checked like the gallery).
        k: neighbours per query, >= 1.
        memory_budget_mb: per-chunk budget in MiB.
        progress: show a tqdm bar over chunks.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if index.ntotal == 0:
        raise ValueError("cannot search an empty index")
    q = validate_embeddings(queries, "query embeddings")
    if q.shape[1] != index.d:
        raise ValueError(f"query dimension {q.shape[1]} != index dimension {index.d}")
    k = min(int(k), int(index.ntotal))
    n = len(q)
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    if n == 0:
        return scores, ids

    chunk = search_chunk_size(index, k, memory_budget_mb)
    starts = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=math.ceil(n / chunk), desc="faiss search", unit="chunk")
    for s in starts:
        e = min(s + chunk, n)
        # search_c writes straight into our slices: no per-chunk result arrays to concatenate.
        index.search(q[s:e], k, D=scores[s:e], I=ids[s:e])
    return scores, ids
