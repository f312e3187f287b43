"""The acceptance rule: a query's top candidates and a threshold in, one decision out.

Everything that says "this photo shows landmark X" goes through :func:`decide`: what ships
(:meth:`recognition.Recognizer.decide`, over the centroid index of ``landmarks index``) and what
training logs (:func:`retrieval.metrics.recognition_at_fpr` over the gallery kNN, and the
centroid-index evaluation of :class:`callbacks.RetrievalEvaluation`). The threshold that goes
with it, calibrated on non-landmark photos, is :func:`threshold_at_fpr` (at most a fraction of
*these* photos pass) or :func:`conformal_threshold` (at most that rate, in expectation, of photos
not yet seen); :func:`recognition.calibration.calibrate_threshold` uses either. Both are derived
from the same comparison.

The rule, for each query (a row of ``[n, k]`` candidates, best first):

1. **Prediction**: the first *allowed* candidate. ``allowed`` is an optional ``[n, k]`` mask: a
   metadata filter (the GPS radius) and the slots an index left empty (id ``-1``) are disallowed.
2. **Acceptance**: the prediction is accepted iff its label is a landmark (``!= NONLANDMARK``;
   a gallery kNN can have a non-landmark photo as its nearest item) and
   ``score >= threshold`` (:func:`accepts`). Both sides are compared as float64, so a
   float32 score and a Python-float threshold compare exactly, whatever NumPy's scalar casting.
3. **No allowed candidate**: no prediction (label ``NONLANDMARK``, score ``-inf``, position
   ``-1``), never accepted.

No other module writes ``score >= threshold``; they call :func:`accepts` or :func:`decide`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from core.labels import NONLANDMARK

__all__ = [
    "Decision",
    "Selection",
    "accepts",
    "check_alpha",
    "admitted_conformal",
    "admitted_empirical",
    "conformal_threshold",
    "decide",
    "select",
    "threshold_admitting",
    "threshold_at_fpr",
]


class Selection(NamedTuple):
    """The prediction of each query (step 1 of the rule), before any threshold."""

    label: np.ndarray  # int64 [n]: label of the first allowed candidate; NONLANDMARK if none
    score: np.ndarray  # float [n]: its score (the input's float dtype); -inf if none
    position: np.ndarray  # int64 [n]: its column in the candidates; -1 if none


class Decision(NamedTuple):
    """:class:`Selection` plus whether each prediction is accepted."""

    label: np.ndarray
    score: np.ndarray
    accepted: np.ndarray  # bool [n]
    position: np.ndarray


def accepts(score, threshold: float) -> np.ndarray:
    """The acceptance comparison, elementwise: ``score >= threshold`` in float64."""
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("the threshold is NaN")
    return np.asarray(score, dtype=np.float64) >= threshold


def select(scores, labels, allowed=None) -> Selection:
    """The first allowed candidate of each row (see the module docstring).

    Args:
        scores: ``[n, k]`` candidate scores, each row sorted descending.
        labels: ``[n, k]`` int labels of the candidates.
        allowed: optional ``[n, k]`` bool mask; ``None`` allows every candidate.
    """
    s = np.asarray(scores)
    lab = np.asarray(labels)
    if s.ndim != 2 or lab.shape != s.shape:
        raise ValueError(f"scores and labels must be [n, k] of equal shape, got {s.shape} and {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if allowed is None:
        ok = np.ones(s.shape, dtype=bool)
    else:
        ok = np.asarray(allowed, dtype=bool)
        if ok.shape != s.shape:
            raise ValueError(f"allowed must have the candidates' shape {s.shape}, got {ok.shape}")
    n, k = s.shape
    has = ok.any(axis=1)
    first = ok.argmax(axis=1) if k else np.zeros(n, dtype=np.int64)
    position = np.where(has, first, -1).astype(np.int64)
    rows, cols = np.arange(n), np.maximum(position, 0)
    score = np.full(n, -np.inf, dtype=s.dtype)
    label = np.full(n, NONLANDMARK, dtype=np.int64)
    score[has] = s[rows[has], cols[has]]
    label[has] = lab[rows[has], cols[has]]
    if np.isnan(score).any():
        raise ValueError(f"a selected candidate's score is NaN (query {int(np.flatnonzero(np.isnan(score))[0])})")
    return Selection(label, score, position)


def decide(scores, labels, threshold: float, allowed=None) -> Decision:
    """The decision for each query: :func:`select`, then accept iff a landmark and :func:`accepts`.

    Args:
        scores: ``[n, k]`` candidate scores, each row sorted descending (``n`` or ``k`` may be 0).
        labels: ``[n, k]`` int labels of the candidates (``NONLANDMARK`` = a non-landmark item).
        threshold: accept iff ``score >= threshold``.
        allowed: optional ``[n, k]`` bool mask (metadata filter, empty index slots).

    Returns:
        :class:`Decision` with ``label``/``score``/``position`` of the prediction (also when it is
        not accepted, so near misses can be inspected) and ``accepted``.
    """
    chosen = select(scores, labels, allowed)
    accepted = (chosen.position >= 0) & (chosen.label != NONLANDMARK) & accepts(chosen.score, threshold)
    return Decision(chosen.label, chosen.score, accepted, chosen.position)


# ----------------------------------------------------------------------------------------------
# the threshold that goes with the rule
# ----------------------------------------------------------------------------------------------


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return alpha


def float_scores(x, name: str) -> np.ndarray:
    """``x`` as a 1-D float array, or a ValueError naming it (wrong shape, NaN)."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


def threshold_admitting(scores, k: int) -> float:
    """The smallest threshold at which :func:`accepts` admits at most ``k`` of ``scores``.

    That is the next representable value above the (k+1)-th highest score, in the scores' own
    float dtype (so that it survives a cast back to it). Scores tied across the k-th / (k+1)-th
    position are rejected as a group: fewer than ``k`` may pass. ``-inf`` when ``k >= n``.
    """
    s = float_scores(scores, "scores")
    n = s.size
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k >= n:
        return -math.inf
    pos = n - k - 1  # ascending position of the (k+1)-th highest score
    kth = np.partition(s, pos)[pos]
    return float(np.nextafter(kth, s.dtype.type(np.inf)))


def admitted_empirical(n: int, alpha: float) -> int:
    """How many of ``n`` calibration scores :func:`threshold_at_fpr` admits: ``floor(alpha * n)``
    (the ``1e-9`` absorbs float error such as ``0.001 * 3000 = 2.9999...``)."""
    return int(math.floor(alpha * n + 1e-9))


def admitted_conformal(n: int, alpha: float) -> int:
    """How many of ``n`` calibration scores :func:`conformal_threshold` admits:
    ``floor(alpha * (n + 1)) - 1``, negative when no threshold keeps its promise."""
    return int(math.floor(alpha * (n + 1) + 1e-9)) - 1


def threshold_at_fpr(distractor_scores, alpha: float) -> float | None:
    """Score threshold admitting at most a fraction ``alpha`` of distractors (accept iff s >= t).

    Let ``n`` = number of distractors and ``k = floor(alpha * n)`` the number of false
    positives allowed (:func:`admitted_empirical`).
    Returns :func:`threshold_admitting` ``(scores, k)``: the smallest ``t`` with
    ``#(scores >= t) <= k``, the next representable value (in the scores' own float dtype, so that
    it survives a cast back to it) above the (k+1)-th highest score. If scores tie across the
    k-th / (k+1)-th position, the whole tied group is therefore rejected and fewer than ``k``
    distractors pass: ties are resolved conservatively. Returns ``-inf`` when ``k >= n``
    (alpha = 1: everything may pass).

    Returns ``None`` when alpha is finer than the data resolves, ``k < 1``, i.e.
    ``n < 1 / alpha`` (including ``n == 0``): a threshold admitting zero of too few distractors
    says nothing about a rate of ``alpha``.
    """
    alpha = check_alpha(alpha)
    s = float_scores(distractor_scores, "distractor_scores")
    n = s.size
    k = admitted_empirical(n, alpha)
    if n == 0 or k < 1:
        return None
    return threshold_admitting(s, k)


def conformal_threshold(calibration_scores, alpha: float) -> float | None:
    """Threshold whose false-positive rate on *new* photos is at most ``alpha`` in expectation.

    :func:`threshold_at_fpr` admits ``k = floor(alpha * n)`` of the ``n`` calibration scores, so
    it is exact on them; but a new photo, exchangeable with them, passes it with probability
    ``(k + 1) / (n + 1)`` over the draw of the calibration set (its rank among the ``n + 1``
    scores is uniform): 3 / 2001 = 1.5e-3 for ``n = 2000`` and ``alpha = 1e-3``. This is the
    split-conformal choice instead: ``k = floor(alpha * (n + 1)) - 1`` admitted, the largest with
    ``(k + 1) / (n + 1) <= alpha`` (Vovk et al. 2005; Angelopoulos & Bates 2021, section 1.1), then
    :func:`threshold_admitting` ``(scores, k)`` (ties rejected as a group, conservatively).

    Returns ``None`` when no threshold keeps the promise, ``k < 0``, i.e. ``n + 1 < 1 / alpha``.
    ``k = 0`` (``1/alpha - 1 <= n < 2/alpha - 1``) admits none of the calibration photos.
    """
    alpha = check_alpha(alpha)
    s = float_scores(calibration_scores, "calibration_scores")
    k = admitted_conformal(s.size, alpha)
    if k < 0:
        return None
    return threshold_admitting(s, k)
