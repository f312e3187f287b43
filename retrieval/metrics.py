"""Landmark-recognition and retrieval metrics: pure functions on numpy arrays (no torch, no state).

Setting (Boiarov & Tyantov, CIKM 2019). Each query photo is matched against a gallery of landmark
photos; its *top-1 prediction* is the landmark label of its nearest gallery item and its *score*
the cosine similarity to that item. A query either shows a landmark (``true_label >= 0``) or is a
*distractor* (``true_label == NONLANDMARK == -1``): an ordinary photo from a user's collection.
Landmarks are rare in such collections, so the system accepts a prediction only when
``score >= t`` and ``t`` is set from the distractors to reach a tiny false-positive rate (FPR).

Conventions shared by every function here
----------------------------------------
* Accept iff ``score >= threshold``: every acceptance is made by :func:`retrieval.decision.decide`,
  the rule that :class:`recognition.Recognizer` applies too, with thresholds from
  :func:`threshold_at_fpr` (defined there, re-exported here).
* A prediction equal to ``NONLANDMARK`` (the nearest gallery item is itself a non-landmark, or an
  approximate index found no neighbour, see :func:`top1_predictions`) is "no prediction": it is
  never accepted and is left out of the GAP ranking.
* Ratios with an empty denominator are ``NaN``, never a made-up 0 or 1 (e.g. precision when
  nothing is accepted, recall with no landmark queries). ``NaN`` shows up in a logger as missing;
  a fake 1.0 would look like a perfect model.
* Retrieval metrics (P@1, mAP@k) are averaged over landmark queries that have at least one
  relevant (same-label) gallery item; the others cannot be answered and are excluded (and counted
  as ``n_queries_no_relevant``). This matches pytorch-metric-learning's "lone query" rule.
  Recognition metrics (recall@FPR, GAP) keep them: there, an unanswerable landmark query is a
  miss, because it is one for the user.

Metric names returned by :func:`evaluate_recognition`
-----------------------------------------------------
``alpha`` is written in scientific notation with the shortest mantissa that round-trips
(``1e-03``, ``2.5e-04``); the prior ``pi`` in ``%g`` notation (``0.01``).

======================================  ========================================================
``recall@fpr={alpha}``                  landmark queries accepted with the correct label, over
                                        all landmark queries, at the threshold for ``alpha``
``precision@fpr={alpha}``               correct accepted / all accepted (correct + wrong-landmark
                                        + distractor acceptances) on the evaluation set itself
``precision@fpr={alpha},prior={pi}``    precision re-weighted to a collection where a fraction
                                        ``pi`` of photos are landmarks (see below)
``recall_low@fpr={alpha}``,             with ``interval_resamples``: the 95 % bootstrap interval of
``recall_high@fpr={alpha}``             the recall over the evaluation set's own sampling
                                        (:func:`recall_interval_at_fpr`)
``threshold@fpr={alpha}``               the score threshold (accept iff score >= threshold)
``actual_fpr@fpr={alpha}``              distractor acceptance rate at that threshold (<= alpha)
``gap``                                 Global Average Precision (GLDv2 definition)
``p@1``                                 precision at 1 (retrieval)
``map@{k}``                             mean average precision at ``k`` (retrieval)
``n_gallery``                           gallery size
``n_queries``                           landmark queries (``query_labels != NONLANDMARK``)
``n_distractors``                       distractor queries (``distractor_emb`` rows plus any
                                        ``query_labels == NONLANDMARK`` rows)
``n_queries_no_relevant``               landmark queries without a same-label gallery item
``saturated_distractors``               distractor queries whose top-1 score is >= 0.99
                                        (:data:`SATURATED_SCORE`), over all distractor queries;
                                        NaN without distractors. A guard against collapse, see
                                        :func:`saturation_warning`
======================================  ========================================================

The ``@fpr`` keys exist only for alphas the distractor set can resolve (``n_distractors * alpha
>= 1``, see :func:`threshold_at_fpr`); with no distractors they are all absent, while ``gap``,
``p@1`` and ``map@k`` are still reported. Counts are ints, everything else floats.

Precision at a prior. Let ``r_c`` = recall, ``r_w`` = wrongly-labelled accepted landmark queries
over landmark queries, ``f`` = actual FPR. In a collection with landmark fraction ``pi``, the
expected fractions of photos accepted correctly / wrongly / as false positives are ``pi r_c``,
``pi r_w`` and ``(1 - pi) f``, so ``precision_at_prior = pi r_c / (pi (r_c + r_w) + (1 - pi) f)``
(NaN when the denominator is 0). Unlike the raw precision, it does not depend on how many
distractors the evaluation set happens to contain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from core.labels import NONLANDMARK
from core.tables import ratio
from retrieval.decision import check_alpha as _check_alpha
from retrieval.decision import decide, float_scores, select, threshold_at_fpr
from retrieval.index import build_index, search

__all__ = [
    "NONLANDMARK",
    "FprMetrics",
    "PrecisionFprCurve",
    "RecognitionResult",
    "evaluate_recognition",
    "fpr_metric_names",
    "format_alpha",
    "gap",
    "map_at_k",
    "precision_at_1",
    "precision_fpr_curve",
    "recall_interval_at_fpr",
    "recognition_at_fpr",
    "relevant_counts",
    "saturated_share",
    "saturation_warning",
    "score_decisions",
    "threshold_at_fpr",
    "top1_predictions",
]

DEFAULT_ALPHAS: tuple[float, ...] = (1e-2, 1e-3, 1e-4)

#: A top-1 cosine this high is what near-duplicate photos score. A trained network that gives it to
#: distractors has put them on top of gallery photos: one center-loss run embedded every dark photo,
#: landmark or not, at one point (cosine 0.996-0.998 between them, a black image 0.98), and its
#: threshold at FPR 1e-2 rose to 0.994 (EXPERIMENTS.md, "a collapse of night photos"). 33 other
#: ArcFace and center-loss fits at that budget had none of their 5,000 distractors this close.
SATURATED_SCORE = 0.99


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def format_alpha(alpha: float) -> str:
    """Shortest scientific notation that round-trips: 1e-3 -> '1e-03', 2.5e-4 -> '2.5e-04'."""
    for digits in range(0, 16):
        s = f"{alpha:.{digits}e}"
        if float(s) == alpha:
            return s
    return repr(alpha)


def _labels(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integer labels, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _predictions(pred_label, score, true_label) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = _labels(pred_label, "pred_label")
    true = _labels(true_label, "true_label")
    s = float_scores(score, "score")
    if not len(pred) == len(s) == len(true):
        raise ValueError(
            f"pred_label, score, true_label lengths differ: {len(pred)}, {len(s)}, {len(true)}"
        )
    return pred, s, true


def _effective_scores(pred: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Scores with "no prediction" (pred == NONLANDMARK) mapped to -inf: never accepted."""
    return np.where(pred == NONLANDMARK, score.dtype.type(-np.inf), score)


# ----------------------------------------------------------------------------------------------
# recognition at a false-positive rate
# ----------------------------------------------------------------------------------------------


class FprMetrics(dict):
    """``{alpha: {metric: value}}`` for the resolvable alphas, in the order they were requested.

    ``.unresolved`` lists the requested alphas that the distractor set cannot resolve (see
    :func:`threshold_at_fpr`); they are omitted from the mapping rather than given fake values.
    """

    def __init__(self, *args, unresolved: tuple[float, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.unresolved = tuple(unresolved)

    def __repr__(self) -> str:
        return f"FprMetrics({dict.__repr__(self)}, unresolved={self.unresolved})"


def recognition_at_fpr(
    pred_label,
    score,
    true_label,
    alphas=DEFAULT_ALPHAS,
    user_prior: float | None = 0.01,
) -> FprMetrics:
    """Recognition quality at fixed false-positive rates on the distractors.

    Args:
        pred_label: [n] int, top-1 predicted landmark of each query (NONLANDMARK = no prediction).
        score: [n] float, top-1 similarity of each query.
        true_label: [n] int, landmark label or NONLANDMARK for distractor queries.
        alphas: target FPRs.
        user_prior: landmark fraction ``pi`` of a user collection for ``precision_at_prior``
            (in (0, 1]); ``None`` skips it.

    Returns:
        :class:`FprMetrics` mapping each resolvable ``alpha`` to a dict with
        ``threshold`` (from :func:`threshold_at_fpr`; each query's top-1 is then decided by
        :func:`retrieval.decision.decide`: accepted iff a prediction and score >= threshold),
        ``fpr`` (actual distractor acceptance rate, <= alpha),
        ``recall`` (correctly-labelled accepted landmark queries / ALL landmark queries),
        ``wrong_rate`` (wrongly-labelled accepted landmark queries / all landmark queries),
        ``precision`` (correct accepted / all accepted incl. wrong-landmark and distractor
        acceptances; NaN when nothing is accepted),
        ``precision_at_prior`` (only if ``user_prior`` is given; formula in the module docstring),
        and the counts ``n_accepted``, ``n_correct``, ``n_wrong``, ``n_false_positives``.
        Unresolvable alphas are listed in ``.unresolved``.
    """
    pred, s, true = _predictions(pred_label, score, true_label)
    _check_prior(user_prior)
    # The threshold is set on the scores at which a distractor's decision would be an acceptance;
    # a distractor without a prediction is never accepted, so it counts as -inf.
    distractor_scores = _effective_scores(pred, s)[true == NONLANDMARK]
    candidates, labels = s[:, None], pred[:, None]  # each query's top-1 is its only candidate

    out: dict[float, dict[str, float]] = {}
    unresolved: list[float] = []
    for alpha in alphas:
        alpha = _check_alpha(alpha)
        t = threshold_at_fpr(distractor_scores, alpha)
        if t is None:
            unresolved.append(alpha)
            continue
        decision = decide(candidates, labels, t)
        out[alpha] = score_decisions(decision.label, decision.accepted, true, t, user_prior)
    return FprMetrics(out, unresolved=tuple(unresolved))


def recall_interval_at_fpr(
    pred_label,
    score,
    true_label,
    alphas=DEFAULT_ALPHAS,
    level: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[float, tuple[float, float]]:
    """How far recall@FPR could move with another draw of the evaluation set: a bootstrap interval.

    At FPR 1e-3 of 5,000 distractors the threshold is set by the 6th highest distractor score, so a
    handful of photos decide the figure. This resamples the landmark queries and the distractors
    separately, with replacement (their counts, hence the ``floor(alpha * n)`` distractors each
    threshold admits, stay those of the set), recomputes :func:`recognition_at_fpr` on each
    resample and returns the percentile interval. It measures the evaluation set's sampling only:
    refitting with another seed moves the figure too, and that is not in the interval.

    Args:
        pred_label, score, true_label: as in :func:`recognition_at_fpr`.
        alphas: target FPRs.
        level: coverage of the two-sided interval, in (0, 1).
        resamples: bootstrap resamples (>= 1).
        seed: seed of the resampling (the same inputs give the same interval).

    Returns:
        ``{alpha: (low, high)}`` for the alphas :func:`recognition_at_fpr` resolves on the set;
        ``(nan, nan)`` when there are no landmark queries.
    """
    pred, s, true = _predictions(pred_label, score, true_label)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    alphas = tuple(_check_alpha(a) for a in alphas)
    resolved = tuple(recognition_at_fpr(pred, s, true, alphas=alphas, user_prior=None))
    landmarks = np.flatnonzero(true != NONLANDMARK)
    distractors = np.flatnonzero(true == NONLANDMARK)
    if not resolved:
        return {}
    if not len(landmarks):
        return {alpha: (math.nan, math.nan) for alpha in resolved}
    rng = np.random.default_rng(seed)
    recalls = np.empty((resamples, len(resolved)))
    for b in range(resamples):
        rows = np.concatenate([rng.choice(landmarks, len(landmarks)), rng.choice(distractors, len(distractors))])
        rows_metrics = recognition_at_fpr(pred[rows], s[rows], true[rows], alphas=resolved, user_prior=None)
        recalls[b] = [rows_metrics[alpha]["recall"] for alpha in resolved]
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(recalls, [tail, 100.0 - tail], axis=0)
    return {alpha: (float(lo), float(hi)) for alpha, lo, hi in zip(resolved, low, high)}


def _check_prior(user_prior: float | None) -> None:
    if user_prior is not None and not 0.0 < user_prior <= 1.0:
        raise ValueError(f"user_prior must be in (0, 1] or None, got {user_prior}")


def score_decisions(pred_label, accepted, true_label, threshold: float, user_prior: float | None = 0.01) -> dict:
    """Count the decisions of one operating point (one threshold) against the truth.

    Args:
        pred_label: [n] int, each query's prediction (:attr:`retrieval.decision.Decision.label`).
        accepted: [n] bool, whether it was accepted (:attr:`retrieval.decision.Decision.accepted`).
        true_label: [n] int, landmark label or NONLANDMARK for distractor queries.
        threshold: the threshold the decisions were made at (reported as is).
        user_prior: as in :func:`recognition_at_fpr`.

    Returns:
        The per-alpha row of :func:`recognition_at_fpr` (same keys, same definitions).
    """
    pred = _labels(pred_label, "pred_label")
    true = _labels(true_label, "true_label")
    acc = np.asarray(accepted, dtype=bool)
    if not len(pred) == len(acc) == len(true):
        raise ValueError(f"pred_label, accepted, true_label lengths differ: {len(pred)}, {len(acc)}, {len(true)}")
    _check_prior(user_prior)
    is_distractor = true == NONLANDMARK
    is_landmark = ~is_distractor
    correct = is_landmark & (pred == true)
    wrong = is_landmark & ~correct
    n_landmark = int(is_landmark.sum())
    n_distractor = int(is_distractor.sum())
    n_fp = int((acc & is_distractor).sum())
    n_c = int((acc & correct).sum())
    n_w = int((acc & wrong).sum())
    f = ratio(n_fp, n_distractor)
    r_c = ratio(n_c, n_landmark)
    r_w = ratio(n_w, n_landmark)
    row = {
        "threshold": float(threshold),
        "fpr": f,
        "recall": r_c,
        "wrong_rate": r_w,
        "precision": ratio(n_c, n_c + n_w + n_fp),
    }
    if user_prior is not None:
        pi = float(user_prior)
        if n_landmark == 0:
            row["precision_at_prior"] = math.nan
        else:
            row["precision_at_prior"] = ratio(pi * r_c, pi * (r_c + r_w) + (1.0 - pi) * f)
    row.update(n_accepted=n_c + n_w + n_fp, n_correct=n_c, n_wrong=n_w, n_false_positives=n_fp)
    return row


def gap(pred_label, score, true_label) -> float:
    """Global Average Precision (Google Landmark Recognition challenge, GLDv2).

    The top-1 predictions of ALL queries, distractors included, are ranked by score descending;
    ``GAP = (1/M) sum_i P(i) rel(i)`` with ``M`` the number of landmark queries
    (``true_label != NONLANDMARK``), ``rel(i) = 1`` iff the i-th ranked prediction is the query's
    true landmark, and ``P(i)`` the precision of the first ``i`` ranked predictions. Equal scores
    keep the query order (stable sort), so the value is deterministic; a worst-case-for-ties
    variant would differ. Queries with no prediction (pred == NONLANDMARK) are not ranked but
    still count in ``M``. Returns NaN when ``M == 0``.
    """
    pred, s, true = _predictions(pred_label, score, true_label)
    m = int((true != NONLANDMARK).sum())
    if m == 0:
        return math.nan
    has_pred = pred != NONLANDMARK
    rel_unsorted = (pred == true)[has_pred]
    order = np.argsort(-s[has_pred], kind="stable")
    rel = rel_unsorted[order]
    precision = np.cumsum(rel) / np.arange(1, rel.size + 1)
    return float((precision * rel).sum() / m)


class PrecisionFprCurve(NamedTuple):
    """Operating points for every distinct score threshold, thresholds descending."""

    fpr: np.ndarray  # distractor acceptance rate (NaN if there are no distractors)
    precision: np.ndarray  # correct accepted / all accepted
    recall: np.ndarray  # correct accepted / landmark queries (NaN if there are none)
    thresholds: np.ndarray  # accept iff score >= threshold


def precision_fpr_curve(pred_label, score, true_label) -> PrecisionFprCurve:
    """FPR, precision and recall at every distinct score threshold (the ROC-style sweep).

    Same definitions as :func:`recognition_at_fpr` (precision counts wrong-landmark and distractor
    acceptances). Point ``j`` accepts the queries with ``score >= thresholds[j]``; thresholds are
    the distinct finite scores of predicted queries, descending, so FPR and recall are
    non-decreasing along the arrays.
    """
    pred, s, true = _predictions(pred_label, score, true_label)
    eff = _effective_scores(pred, s)
    is_distractor = true == NONLANDMARK
    correct = ~is_distractor & (pred == true)
    n_landmark = int((~is_distractor).sum())
    n_distractor = int(is_distractor.sum())

    order = np.argsort(-eff, kind="stable")
    s_sorted = eff[order]
    cum_fp = np.cumsum(is_distractor[order])
    cum_c = np.cumsum(correct[order])
    cum_all = np.arange(1, s_sorted.size + 1)
    # One point per tie group (its last member), since a threshold cannot split ties.
    last_of_group = np.r_[s_sorted[1:] != s_sorted[:-1], True] if s_sorted.size else np.zeros(0, bool)
    keep = last_of_group & np.isfinite(s_sorted)
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = cum_fp[keep] / n_distractor if n_distractor else np.full(keep.sum(), np.nan)
        recall = cum_c[keep] / n_landmark if n_landmark else np.full(keep.sum(), np.nan)
        precision = cum_c[keep] / cum_all[keep]
    return PrecisionFprCurve(
        fpr=np.asarray(fpr, dtype=np.float64),
        precision=np.asarray(precision, dtype=np.float64),
        recall=np.asarray(recall, dtype=np.float64),
        thresholds=s_sorted[keep],
    )


# ----------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------


def top1_predictions(gallery_labels, scores, ids) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 landmark label and score of each query from a search result.

    ``scores``/``ids`` are ``[n, k]`` from :func:`retrieval.index.search`. The prediction is the
    first candidate with an id (:func:`retrieval.decision.select`; faiss pads missing neighbours
    with id ``-1`` at the end of a row, so that is column 0 whenever there is one). A query with
    no id at all (an approximate index found nothing) gets ``(NONLANDMARK, -inf)``: no prediction.
    Returns ``(pred_label int64 [n], score float32 [n])``.
    """
    gl = _labels(gallery_labels, "gallery_labels")
    scores = np.asarray(scores)
    ids = np.asarray(ids)
    if ids.ndim != 2 or scores.shape != ids.shape or ids.shape[1] < 1:
        raise ValueError(f"scores/ids must be [n, k>=1] of equal shape, got {scores.shape}, {ids.shape}")
    valid = ids >= 0
    if gl.size == 0:
        valid = np.zeros_like(valid)
    if valid.any() and ids[valid].max() >= gl.size:
        raise ValueError(f"ids reference gallery row {ids[valid].max()} but gallery has {gl.size} labels")
    labels = gl[np.where(valid, ids, 0)] if gl.size else np.full(ids.shape, NONLANDMARK, np.int64)
    chosen = select(scores, labels, allowed=valid)
    return chosen.label, chosen.score.astype(np.float32)


def relevant_counts(gallery_labels, query_labels) -> np.ndarray:
    """Number of gallery items sharing each query's label (0 for NONLANDMARK queries)."""
    gl = _labels(gallery_labels, "gallery_labels")
    ql = _labels(query_labels, "query_labels")
    uniq, counts = np.unique(gl, return_counts=True)
    if uniq.size == 0:
        return np.zeros(ql.shape, dtype=np.int64)
    pos = np.clip(np.searchsorted(uniq, ql), 0, uniq.size - 1)
    out = np.where(uniq[pos] == ql, counts[pos], 0)
    out[ql == NONLANDMARK] = 0
    return out.astype(np.int64)


def _hits(gl: np.ndarray, ids: np.ndarray, ql: np.ndarray) -> np.ndarray:
    """[n, k] bool: retrieved item is relevant. Id -1 (no neighbour) is never relevant."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or len(ids) != len(ql):
        raise ValueError(f"topk_ids must be [n_queries={len(ql)}, k], got {ids.shape}")
    valid = ids >= 0
    if valid.any() and ids.max() >= gl.size:
        raise ValueError(f"topk_ids reference gallery row {ids.max()} but gallery has {gl.size} labels")
    labels = gl[np.where(valid, ids, 0)] if gl.size else np.zeros(ids.shape, np.int64)
    return valid & (labels == ql[:, None]) & (ql[:, None] != NONLANDMARK)


def precision_at_1(gallery_labels, topk_ids, query_labels) -> float:
    """Fraction of answerable landmark queries whose nearest gallery item has their label.

    Averaged over queries with ``query_label != NONLANDMARK`` and at least one same-label gallery
    item (pytorch-metric-learning's rule for "lone" queries); NaN if there are none.
    """
    gl = _labels(gallery_labels, "gallery_labels")
    ql = _labels(query_labels, "query_labels")
    ids = np.asarray(topk_ids)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"topk_ids must be [n, k>=1], got {ids.shape}")
    answerable = relevant_counts(gl, ql) > 0
    if not answerable.any():
        return math.nan
    hit = _hits(gl, ids[:, :1], ql)[:, 0]
    return float(hit[answerable].mean())


def map_at_k(gallery_labels, topk_ids, query_labels, k: int) -> float:
    """Mean average precision at ``k`` (Google Landmark Retrieval challenge definition).

    ``AP@k(q) = (1 / min(k, n_rel(q))) * sum_{i<=k} P@i(q) * rel_i(q)``, with ``n_rel(q)`` the
    number of same-label gallery items, averaged over landmark queries with ``n_rel(q) > 0`` (the
    others are excluded, as in :func:`precision_at_1`); NaN if there are none. ``topk_ids`` needs
    at least ``min(k, n_gallery)`` columns.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gl = _labels(gallery_labels, "gallery_labels")
    ql = _labels(query_labels, "query_labels")
    ids = np.asarray(topk_ids)
    need = min(k, gl.size)
    if ids.ndim != 2 or ids.shape[1] < need:
        raise ValueError(f"topk_ids must have at least min(k, n_gallery)={need} columns, got {ids.shape}")
    n_rel = relevant_counts(gl, ql)
    answerable = n_rel > 0
    if not answerable.any():
        return math.nan
    rel = _hits(gl, ids[answerable, :k], ql[answerable])
    prec = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    ap = (prec * rel).sum(axis=1) / np.minimum(k, n_rel[answerable])
    return float(ap.mean())


# ----------------------------------------------------------------------------------------------
# one-call evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class RecognitionResult:
    """Output of :func:`evaluate_recognition`.

    ``metrics`` uses the naming scheme of the module docstring. The arrays are per query, for
    plots (:mod:`retrieval.plots`): top-1 scores of landmark queries (``-inf`` = no prediction),
    whether their top-1 label is correct, top-1 scores of distractor queries and, per distractor,
    the gallery row it matched (``distractor_matches``, -1 = none), to show which photos decide a
    threshold (:func:`hardest_distractors`).
    """

    metrics: dict[str, float]
    landmark_scores: np.ndarray
    landmark_correct: np.ndarray
    distractor_scores: np.ndarray
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    unresolved_alphas: tuple[float, ...] = ()
    user_prior: float | None = None
    k: int = 10
    distractor_matches: np.ndarray | None = None

    def as_predictions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Synthetic ``(pred_label, score, true_label)`` reproducing every recognition metric.

        Landmark queries get true label 0 and prediction 0 (correct) or 1 (wrong); distractors get
        true label NONLANDMARK and prediction 0; a ``-inf`` score (no prediction) gets prediction
        NONLANDMARK. Only correctness matters to the recognition metrics, so feeding these to
        :func:`precision_fpr_curve` / :func:`recognition_at_fpr` gives the same numbers as the
        original labels, and GAP too (up to the query order among exactly tied scores).
        """
        n_l, n_d = len(self.landmark_scores), len(self.distractor_scores)
        pred = np.concatenate([np.where(self.landmark_correct, 0, 1), np.zeros(n_d, np.int64)])
        true = np.concatenate([np.zeros(n_l, np.int64), np.full(n_d, NONLANDMARK, np.int64)])
        score = np.concatenate([self.landmark_scores, self.distractor_scores]).astype(np.float32)
        pred = np.where(np.isneginf(score), NONLANDMARK, pred)
        return pred.astype(np.int64), score, true

    def curve(self) -> PrecisionFprCurve:
        return precision_fpr_curve(*self.as_predictions())


def saturated_share(distractor_scores, at: float = SATURATED_SCORE) -> float:
    """Share of distractors whose top-1 score is ``>= at``; NaN without distractors.

    ``-inf`` (no prediction, :func:`top1_predictions`) is never saturated.
    """
    s = float_scores(distractor_scores, "distractor_scores")
    return float((s >= at).mean()) if s.size else math.nan


def saturation_warning(metrics: dict, photos: str = "distractors", matched: str = "a gallery photo") -> str | None:
    """One line when a recognition operating point lies among saturated scores, else ``None``.

    ``metrics`` as :func:`evaluate_recognition` names them. It warns when ``saturated_distractors``
    is above 0 and a ``threshold@fpr=`` is at or above :data:`SATURATED_SCORE`. Then the recall at that
    FPR is decided among distractors that match a gallery photo as closely as a near-duplicate
    would, which is the signature of inputs collapsed onto one point. A contrastive fit that packs
    each landmark into a point of cosine 0.99 shows it too, at FPR 1e-3: there the distractors that
    pass fall inside a landmark's own cluster.

    ``photos`` and ``matched`` name what the scores are of, e.g. ``landmarks index``'s calibration
    photos against its index vectors.
    """
    share, n = metrics.get("saturated_distractors"), int(metrics.get("n_distractors") or 0)
    if share is None or not share > 0 or not n:
        return None
    at = [key.split("=", 1)[1] for key, value in metrics.items()
          if key.startswith("threshold@fpr=") and value is not None and value >= SATURATED_SCORE]
    if not at:
        return None
    return (f"{round(share * n)} of {n} {photos} ({share:.2%}) match {matched} at cosine >= {SATURATED_SCORE:g}, "
            f"so the threshold at FPR {', '.join(at)} lies among near-duplicate scores: the embedding may have "
            "put some non-landmark photos on top of landmark photos (e.g. every dark photo at one point)")


def fpr_metric_names(fpr_metrics: FprMetrics, user_prior: float | None) -> dict[str, float]:
    """The ``@fpr`` entries of the module docstring's table from :func:`recognition_at_fpr` rows."""
    metrics: dict[str, float] = {}
    for alpha, row in fpr_metrics.items():
        a = format_alpha(alpha)
        metrics[f"recall@fpr={a}"] = row["recall"]
        metrics[f"precision@fpr={a}"] = row["precision"]
        if user_prior is not None:
            metrics[f"precision@fpr={a},prior={user_prior:g}"] = row["precision_at_prior"]
        metrics[f"threshold@fpr={a}"] = row["threshold"]
        metrics[f"actual_fpr@fpr={a}"] = row["fpr"]
    return metrics


def evaluate_recognition(
    gallery_emb: np.ndarray,
    gallery_labels,
    query_emb: np.ndarray,
    query_labels,
    distractor_emb: np.ndarray | None = None,
    alphas=DEFAULT_ALPHAS,
    k: int = 10,
    user_prior: float | None = 0.01,
    index_kind: str = "flat",
    memory_budget_mb: float = 256,
    progress: bool = False,
    interval_resamples: int = 0,
    **index_kwargs,
) -> RecognitionResult:
    """Build an index over the gallery, search queries and distractors, compute every metric.

    Args:
        gallery_emb: [n_g, d] L2-normalised float32 gallery embeddings.
        gallery_labels: [n_g] int landmark labels.
        query_emb: [n_q, d] L2-normalised query embeddings.
        query_labels: [n_q] int; NONLANDMARK rows are treated as distractor queries.
        distractor_emb: optional [n_d, d] L2-normalised distractor (non-landmark) embeddings.
        alphas: target FPRs for the ``@fpr`` metrics.
        k: search depth and the cut-off of ``map@{k}``.
        user_prior: landmark fraction for ``precision@fpr=...,prior=...`` (None: skip).
        index_kind, index_kwargs: forwarded to :func:`retrieval.index.build_index`.
        memory_budget_mb, progress: forwarded to :func:`retrieval.index.search`.
        interval_resamples: > 0 adds ``recall_low@fpr`` / ``recall_high@fpr``, the 95 % interval
            of :func:`recall_interval_at_fpr` with this many resamples (seed 0).

    Returns:
        :class:`RecognitionResult`; names in ``metrics`` follow the module docstring.
    """
    gl = _labels(gallery_labels, "gallery_labels")
    ql = _labels(query_labels, "query_labels")
    if len(gl) != len(gallery_emb):
        raise ValueError(f"{len(gallery_emb)} gallery embeddings but {len(gl)} gallery labels")
    if len(ql) != len(query_emb):
        raise ValueError(f"{len(query_emb)} query embeddings but {len(ql)} query labels")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    alphas = tuple(_check_alpha(a) for a in alphas)

    index = build_index(gallery_emb, kind=index_kind, **index_kwargs)
    q_scores, q_ids = search(index, query_emb, k, memory_budget_mb=memory_budget_mb, progress=progress)
    q_pred, q_top = top1_predictions(gl, q_scores, q_ids)
    if distractor_emb is not None and len(distractor_emb):
        # Distractors only need their top-1: k=1 keeps that search cheap.
        d_scores, d_ids = search(index, distractor_emb, 1, memory_budget_mb=memory_budget_mb, progress=progress)
        d_pred, d_top = top1_predictions(gl, d_scores, d_ids)
        d_match = np.where(np.isneginf(d_top), -1, d_ids[:, 0]).astype(np.int64)
    else:
        d_pred = np.empty(0, np.int64)
        d_top = np.empty(0, np.float32)
        d_match = np.empty(0, np.int64)
    del index

    pred = np.concatenate([q_pred, d_pred])
    score = np.concatenate([q_top, d_top])
    true = np.concatenate([ql, np.full(len(d_pred), NONLANDMARK, np.int64)])
    is_landmark = true != NONLANDMARK

    n_rel = relevant_counts(gl, ql)
    fpr_metrics = recognition_at_fpr(pred, score, true, alphas=alphas, user_prior=user_prior)
    metrics: dict[str, float] = fpr_metric_names(fpr_metrics, user_prior)
    if interval_resamples > 0:
        intervals = recall_interval_at_fpr(pred, score, true, alphas=tuple(fpr_metrics), resamples=interval_resamples)
        for alpha, (low, high) in intervals.items():
            metrics[f"recall_low@fpr={format_alpha(alpha)}"] = low
            metrics[f"recall_high@fpr={format_alpha(alpha)}"] = high
    metrics["gap"] = gap(pred, score, true)
    metrics["p@1"] = precision_at_1(gl, q_ids, ql)
    metrics[f"map@{k}"] = map_at_k(gl, q_ids, ql, k)
    metrics["n_gallery"] = int(len(gl))
    metrics["n_queries"] = int(is_landmark.sum())
    metrics["n_distractors"] = int((~is_landmark).sum())
    metrics["n_queries_no_relevant"] = int(((ql != NONLANDMARK) & (n_rel == 0)).sum())
    metrics["saturated_distractors"] = saturated_share(_effective_scores(pred, score)[~is_landmark])

    return RecognitionResult(
        metrics=metrics,
        landmark_scores=score[is_landmark],
        landmark_correct=(pred == true)[is_landmark],
        distractor_scores=score[~is_landmark],
        alphas=alphas,
        unresolved_alphas=fpr_metrics.unresolved,
        user_prior=user_prior,
        k=k,
        distractor_matches=d_match,
    )


def hardest_distractors(distractor_scores, count: int) -> np.ndarray:
    """Rows of the ``count`` highest distractor top-1 scores, highest first (ties: lower row first).

    At FPR ``alpha`` over ``n`` distractors the threshold lies just above the ``floor(alpha * n) + 1``-th
    highest score (:func:`retrieval.decision.threshold_at_fpr`), so these few photos decide the
    operating point; ``-inf`` (no prediction) is never among them.
    """
    s = float_scores(distractor_scores, "distractor_scores")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rows = np.flatnonzero(~np.isneginf(s))
    order = rows[np.argsort(-s[rows], kind="stable")]
    return order[:count]
