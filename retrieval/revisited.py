"""The Revisited Oxford / Paris evaluation protocol (Radenović et al., CVPR 2018): pure functions.

ROxford5k and RParis6k annotate, for each of their 70 queries, which database images are
``easy`` or ``hard`` positives and which are ``junk`` (unclear, or showing too little of the
landmark to count either way). Junk images are *removed from the ranking* before anything is
counted, so returning them is neither rewarded nor punished. Three setups re-label the same
annotation:

=========  ===========================  ======================
setup      positives                    junk (removed)
=========  ===========================  ======================
Easy       easy                         junk + hard
Medium     easy + hard                  junk
Hard       hard                         junk + easy
=========  ===========================  ======================

Definitions, as in the official ``compute_map`` of ``filipradenovic/revisitop`` (re-derived
here, not copied), for one query with ``n`` positives:

* Ranking. ``ranks[q]`` lists every database index, best first (the full ranking; an image
  missing from it could not be counted). Junk is removed: a positive at 0-based position ``p``
  moves to ``p' = p - (number of junk images ranked before it)``.
* Average precision by the trapezoidal rule over the precision–recall curve: the ``j``-th
  positive (0-based) at ``p'`` adds ``(P0 + P1) / 2 * (1 / n)`` with ``P1 = (j + 1) / (p' + 1)``
  (precision just after it) and ``P0 = j / p'`` (just before it; 1 when ``p' = 0``). This is
  *not* the usual non-interpolated AP ``mean_j (j + 1) / (p'_j + 1)``, and gives lower values
  when positives are ranked late (see the tests).
* Precision at ``k`` uses ``k_q = min(k, last positive's 1-based position)``:
  ``P@k = #(positives at 1-based positions <= k_q) / k_q``. A query with fewer than ``k``
  positives, all ranked first, therefore scores 1, not ``n / k``.
* A query without positives in a setup (e.g. no ``hard`` image) is skipped in that setup: its
  AP and P@k are NaN and the means are over the remaining queries (``n_evaluated``). If every
  query is skipped, the mean is NaN.

Metric names returned by :func:`revisited_metrics`: ``map_{setup}`` and ``mp@{k}_{setup}`` with
``setup`` in ``easy, medium, hard``, fractions in [0, 1] (the paper prints percentages), plus
``n_evaluated_{setup}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "DEFAULT_KAPPAS",
    "SETUPS",
    "ProtocolResult",
    "average_precision",
    "protocol_ground_truth",
    "rank_database",
    "revisited_map",
    "revisited_metrics",
]

DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)
# setup -> (labels that are positives, labels that are junk)
SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def _index_array(values, name: str) -> np.ndarray:
    if values is None:
        return np.zeros(0, dtype=np.int64)
    a = np.asarray(values).reshape(-1)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.mod(a, 1) == 0):
            raise ValueError(f"{name} must hold integer database indices, got {a.dtype}")
    a = a.astype(np.int64)
    if a.min() < 0:
        raise ValueError(f"{name} holds a negative database index ({a.min()})")
    return a


def _adjusted_positions(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in ``ranking`` after removing the junk images, ascending."""
    pos = np.flatnonzero(np.isin(ranking, positives))
    if junk.size == 0:
        return pos
    junk_pos = np.flatnonzero(np.isin(ranking, junk))
    # Junk strictly before each positive (an image listed as both counts as a positive for itself).
    return pos - np.searchsorted(junk_pos, pos, side="left")


def average_precision(adjusted_positions: np.ndarray, n_positives: int) -> float:
    """Trapezoidal AP from the positives' junk-adjusted 0-based positions (see module docstring)."""
    if n_positives <= 0:
        return math.nan
    p = np.asarray(adjusted_positions, dtype=np.float64)
    j = np.arange(p.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        before = np.where(p == 0, 1.0, j / p)
    after = (j + 1.0) / (p + 1.0)
    return float(((before + after) / 2.0).sum() / n_positives)


def _precision_at(adjusted_positions: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    one_based = np.asarray(adjusted_positions, dtype=np.int64) + 1
    out = np.zeros(len(kappas), dtype=np.float64)
    if one_based.size == 0:  # positives exist but none was ranked: nothing found at any k
        return out
    last = int(one_based.max())
    for i, k in enumerate(kappas):
        kq = min(last, int(k))
        out[i] = float((one_based <= kq).sum()) / kq
    return out


@dataclass
class ProtocolResult:
    """One setup's result: the means and the per-query values (NaN for skipped queries)."""

    mean_ap: float
    mean_precision: dict[int, float]
    ap: np.ndarray  # [n_queries]
    precision: np.ndarray  # [n_queries, len(kappas)]
    n_evaluated: int


def _check_ranks(ranks, n_queries: int, n_database: int | None) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 2 or r.shape[0] != n_queries:
        raise ValueError(f"ranks must be [n_queries={n_queries}, n_database], got shape {r.shape}")
    if r.size and not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices, got {r.dtype}")
    if n_database is not None and r.shape[1] != n_database:
        raise ValueError(
            f"ranks has {r.shape[1]} columns but the database has {n_database} images: the protocol needs the "
            "full ranking (every database image once per query)"
        )
    if r.size and (r.min() < 0 or (n_database is not None and r.max() >= n_database)):
        raise ValueError(f"ranks holds indices outside [0, {n_database}): min {r.min()}, max {r.max()}")
    return r.astype(np.int64, copy=False)


def revisited_map(
    ranks,
    ground_truth: Sequence[Mapping[str, Iterable[int]]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    n_database: int | None = None,
) -> ProtocolResult:
    """mAP and mP@k over queries, each with its ``ok`` (positive) and ``junk`` database indices.

    Args:
        ranks: ``[n_queries, n_database]`` int, ``ranks[q]`` = database indices best first
            (query-major; the official code takes the transpose).
        ground_truth: per query a mapping with ``ok`` and optionally ``junk`` index lists.
        kappas: the ``k`` of mP@k.
        n_database: database size; when given, ``ranks`` must be a full ranking of it.
    """
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas must be >= 1, got {kappas}")
    r = _check_ranks(ranks, len(ground_truth), n_database)
    n_q = len(ground_truth)
    aps = np.full(n_q, np.nan)
    prs = np.full((n_q, len(kappas)), np.nan)
    for q, g in enumerate(ground_truth):
        ok = _index_array(g.get("ok"), f"query {q} 'ok'")
        if ok.size == 0:
            continue  # no positive: skipped, as in the official protocol
        junk = _index_array(g.get("junk"), f"query {q} 'junk'")
        adjusted = _adjusted_positions(r[q], ok, junk)
        aps[q] = average_precision(adjusted, ok.size)
        prs[q] = _precision_at(adjusted, kappas)
    evaluated = ~np.isnan(aps)
    n_eval = int(evaluated.sum())
    mean_ap = float(aps[evaluated].mean()) if n_eval else math.nan
    mean_pr = {k: (float(prs[evaluated, i].mean()) if n_eval else math.nan) for i, k in enumerate(kappas)}
    return ProtocolResult(mean_ap=mean_ap, mean_precision=mean_pr, ap=aps, precision=prs, n_evaluated=n_eval)


def protocol_ground_truth(gnd: Sequence[Mapping[str, Iterable[int]]], setup: str) -> list[dict[str, np.ndarray]]:
    """The ``ok``/``junk`` lists of one setup (Easy/Medium/Hard) from ``easy``/``hard``/``junk``."""
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}; one of {sorted(SETUPS)}")
    positive_keys, junk_keys = SETUPS[setup]
    out = []
    for q, g in enumerate(gnd):
        missing = [key for key in ("easy", "hard", "junk") if key not in g]
        if missing:
            raise ValueError(f"ground truth of query {q} lacks {missing}")
        out.append({
            "ok": np.concatenate([_index_array(g[key], f"query {q} {key!r}") for key in positive_keys]),
            "junk": np.concatenate([_index_array(g[key], f"query {q} {key!r}") for key in junk_keys]),
        })
    return out


def rank_database(query_emb: np.ndarray, database_emb: np.ndarray) -> np.ndarray:
    """Full ranking by inner product (cosine for unit rows), ``[n_queries, n_database]``.

    Ties keep database order (stable sort), so the result is deterministic.
    """
    q = np.asarray(query_emb, dtype=np.float32)
    x = np.asarray(database_emb, dtype=np.float32)
    if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"embeddings must be [n, d] with equal d, got {q.shape} and {x.shape}")
    return np.argsort(-(q @ x.T), axis=1, kind="stable")


def revisited_metrics(
    ranks,
    gnd: Sequence[Mapping[str, Iterable[int]]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    n_database: int | None = None,
) -> dict[str, float]:
    """All three setups: ``map_{setup}``, ``mp@{k}_{setup}``, ``n_evaluated_{setup}``."""
    metrics: dict[str, float] = {}
    for setup in SETUPS:
        result = revisited_map(ranks, protocol_ground_truth(gnd, setup), kappas, n_database)
        metrics[f"map_{setup}"] = result.mean_ap
        for k, value in result.mean_precision.items():
            metrics[f"mp@{k}_{setup}"] = value
        metrics[f"n_evaluated_{setup}"] = result.n_evaluated
    return metrics
