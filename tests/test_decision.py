"""The one acceptance rule (retrieval/decision.py), hand-computed, and who calls it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.labels import NONLANDMARK
from retrieval.decision import accepts, decide, select, threshold_admitting, threshold_at_fpr

L = NONLANDMARK


def test_tie_at_the_threshold_is_accepted():
    scores = np.array([[0.5], [np.nextafter(0.5, 0.0)], [0.7]])
    d = decide(scores, [[1], [2], [3]], 0.5)
    assert d.accepted.tolist() == [True, False, True]
    assert d.label.tolist() == [1, 2, 3] and d.position.tolist() == [0, 0, 0]


def test_float32_scores_are_compared_exactly_in_float64():
    # NumPy 2 compares a float32 array with a Python float in float32 (NEP 50), which would round
    # this threshold down to 0.5 and accept. The rule compares exactly: 0.5 < 0.5 + 1e-12.
    s = np.array([[0.5]], dtype=np.float32)
    assert not decide(s, [[1]], 0.5 + 1e-12).accepted[0]
    assert decide(s, [[1]], 0.5).accepted[0]
    # a threshold from threshold_at_fpr is a float32 value, so a float32 comparison agrees with the rule
    d = np.array([0.7, 0.3, 0.2, 0.1], np.float32)
    t = threshold_at_fpr(d, 0.25)
    assert accepts(d, t).tolist() == (d >= np.float32(t)).tolist() == [True, False, False, False]
    assert decide(s, [[1]], t).score.dtype == np.float32


def test_filtered_first_candidate_falls_back_to_the_second():
    scores = np.array([[0.9, 0.7, 0.2]])
    labels = np.array([[3, 5, 8]])
    allowed = np.array([[False, True, True]])
    d = decide(scores, labels, 0.6, allowed)
    assert (d.label[0], d.score[0], d.accepted[0], d.position[0]) == (5, 0.7, True, 1)
    # above the second's score: the second is the prediction, rejected; the filtered first is not used
    d = decide(scores, labels, 0.8, allowed)
    assert (d.label[0], d.score[0], d.accepted[0], d.position[0]) == (5, 0.7, False, 1)
    # without the filter the first wins
    assert decide(scores, labels, 0.8).label[0] == 3


def test_all_candidates_filtered_is_no_prediction():
    d = decide([[0.9, 0.8]], [[3, 5]], -math.inf, allowed=[[False, False]])
    assert d.label.tolist() == [L] and d.position.tolist() == [-1]
    assert d.score[0] == -np.inf and not d.accepted[0]  # not even at threshold -inf


def test_nonlandmark_candidate_is_the_prediction_and_never_accepted():
    # A gallery kNN whose nearest item is a non-landmark photo: no fall-back to the next one.
    d = decide([[0.95, 0.9]], [[L, 4]], -math.inf)
    assert (d.label[0], d.score[0], d.accepted[0], d.position[0]) == (L, 0.95, False, 0)


def test_rows_are_independent():
    scores = np.array([[0.9, 0.8], [0.6, 0.5], [0.4, 0.3]])
    labels = np.array([[1, 2], [3, 4], [5, 6]])
    allowed = np.array([[True, True], [False, True], [False, False]])
    d = decide(scores, labels, 0.5, allowed)
    assert d.label.tolist() == [1, 4, L]
    assert d.score.tolist() == [0.9, 0.5, -np.inf]
    assert d.accepted.tolist() == [True, True, False]
    assert d.position.tolist() == [0, 1, -1]


def test_empty_inputs():
    d = decide(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.int64), 0.5)
    assert d.label.shape == d.score.shape == d.accepted.shape == d.position.shape == (0,)
    assert d.label.dtype == np.int64 and d.accepted.dtype == bool and d.score.dtype == np.float32
    d = decide(np.zeros((2, 0)), np.zeros((2, 0), np.int64), 0.5)  # no candidates at all
    assert d.label.tolist() == [L, L] and not d.accepted.any() and d.position.tolist() == [-1, -1]


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal shape"):
        decide([[0.5, 0.4]], [[1]], 0.5)
    with pytest.raises(ValueError, match="allowed"):
        decide([[0.5]], [[1]], 0.5, allowed=[[True, False]])
    with pytest.raises(ValueError, match="NaN"):
        decide([[0.5]], [[1]], math.nan)
    with pytest.raises(ValueError, match="NaN"):
        decide([[np.nan]], [[1]], 0.5)
    with pytest.raises(ValueError, match="integers"):
        select([[0.5]], [[1.0]])


def test_calibrated_threshold_is_consistent_with_the_rule():
    from recognition.calibration import calibrate_threshold

    rng = np.random.default_rng(0)
    s = np.round(rng.random(3000), 2).astype(np.float32)  # many ties
    for alpha in (1e-3, 1e-2, 0.1, 0.5):
        k = int(math.floor(alpha * len(s) + 1e-9))
        t = threshold_at_fpr(s, alpha)
        n_accepted = int(decide(s[:, None], np.zeros((len(s), 1), np.int64), t).accepted.sum())
        assert n_accepted <= k
        # the smallest such threshold: one float32 step lower admits more than k
        below = float(np.nextafter(np.float32(t), np.float32(-np.inf)))
        assert int(accepts(s, below).sum()) > k
        # `landmarks index` calibration is the same function
        cal = calibrate_threshold(s, alpha)
        assert cal.threshold == t and cal.n_false_positives == n_accepted
    assert threshold_admitting(s, len(s)) == -math.inf
    assert threshold_admitting(s, 0) > s.max() and int(accepts(s, threshold_admitting(s, 0)).sum()) == 0


def test_recognition_at_fpr_decides_with_the_rule(monkeypatch):
    import retrieval.decision
    import retrieval.metrics

    thresholds = []

    def spy(scores, labels, threshold, allowed=None):
        thresholds.append(threshold)
        return retrieval.decision.decide(scores, labels, threshold, allowed)

    monkeypatch.setattr(retrieval.metrics, "decide", spy)
    res = retrieval.metrics.recognition_at_fpr([1, 2] + [0] * 10, [0.9, 0.3] + list(np.linspace(0.1, 0.5, 10)),
                                               [1, 2] + [L] * 10, alphas=(0.1, 0.2))
    assert thresholds == [res[0.1]["threshold"], res[0.2]["threshold"]]
