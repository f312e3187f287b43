"""Hand-computed checks of retrieval/metrics.py (and a cross-check of P@1 against PML)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from core.labels import NONLANDMARK
from retrieval.index import build_index, search
from retrieval.metrics import (
    PrecisionFprCurve,
    evaluate_recognition,
    format_alpha,
    gap,
    map_at_k,
    precision_at_1,
    precision_fpr_curve,
    recall_interval_at_fpr,
    recognition_at_fpr,
    relevant_counts,
    saturated_share,
    saturation_warning,
    threshold_at_fpr,
    top1_predictions,
)
from retrieval.plots import plot_precision_fpr, plot_score_histograms

L = NONLANDMARK


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng, n_classes, n, d, noise, centers=None):
    if centers is None:
        centers = rng.standard_normal((n_classes, d))
    labels = rng.integers(0, n_classes, n)
    return unit(centers[labels] + noise * rng.standard_normal((n, d))), labels, centers


# ----------------------------------------------------------------------------------------------
# threshold_at_fpr
# ----------------------------------------------------------------------------------------------


def test_threshold_basic():
    s = np.arange(1, 11) / 10.0  # 0.1 .. 1.0, n = 10
    # alpha = 0.1 -> k = 1 false positive allowed; (k+1)-th highest is 0.9 -> t just above 0.9.
    t = threshold_at_fpr(s, 0.1)
    assert t == np.nextafter(0.9, np.inf)
    assert (s >= t).sum() == 1
    # alpha = 0.3 -> k = 3; 4th highest is 0.7.
    t = threshold_at_fpr(s, 0.3)
    assert t == np.nextafter(0.7, np.inf) and (s >= t).sum() == 3


def test_threshold_ties_are_excluded_as_a_group():
    # k = 1 but the top two distractors tie: the threshold must reject both.
    s = np.array([0.9, 0.9, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1, 0.05, 0.0])
    t = threshold_at_fpr(s, 0.1)
    assert t == np.nextafter(0.9, np.inf)
    assert (s >= t).sum() == 0
    # k = 2 with the 2nd and 3rd tied: only the single top score passes.
    s = np.array([1.0, 0.9, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0])
    t = threshold_at_fpr(s, 0.2)
    assert (s >= t).sum() == 1 and 0.9 < t <= 1.0


def test_threshold_keeps_float32_dtype_semantics():
    s = np.array([0.7, 0.3, 0.2, 0.1], dtype=np.float32)
    t = threshold_at_fpr(s, 0.25)  # k = 1 -> just above the float32 0.3
    assert t == float(np.nextafter(np.float32(0.3), np.float32(np.inf)))
    # survives a round trip through float32, so a float32 consumer makes the same decisions
    assert np.float32(t) > np.float32(0.3)
    assert (s >= np.float32(t)).sum() == 1


def test_threshold_unresolvable_alpha():
    assert threshold_at_fpr(np.array([]), 0.1) is None  # no distractors
    assert threshold_at_fpr(np.linspace(0, 1, 999), 1e-3) is None  # n < 1/alpha
    assert threshold_at_fpr(np.linspace(0, 1, 1000), 1e-3) is not None  # n == 1/alpha: k = 1
    # 0.001 * 3000 is 3.0000000000000004 or 2.9999... depending on rounding: k must be 3.
    s = np.linspace(0, 1, 3000)
    t = threshold_at_fpr(s, 1e-3)
    assert (s >= t).sum() == 3


def test_threshold_alpha_one_and_bad_alpha():
    assert threshold_at_fpr(np.array([0.2, 0.1]), 1.0) == -math.inf
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            threshold_at_fpr(np.array([0.1]), bad)
    with pytest.raises(ValueError, match="NaN"):
        threshold_at_fpr(np.array([0.1, np.nan]), 0.5)


# ----------------------------------------------------------------------------------------------
# recognition_at_fpr
# ----------------------------------------------------------------------------------------------

# 10 distractors and 4 landmark queries:
#   a: true 1 pred 1 score 0.90  correct
#   b: true 2 pred 2 score 0.50  correct, ties the 2nd-highest distractor
#   c: true 3 pred 4 score 0.80  wrong landmark
#   d: true 5 pred 5 score 0.60  correct
DISTRACTOR_SCORES = [0.95, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1]
HAND_PRED = np.array([1, 2, 4, 5] + [7] * 10)
HAND_SCORE = np.array([0.9, 0.5, 0.8, 0.6] + DISTRACTOR_SCORES)
HAND_TRUE = np.array([1, 2, 3, 5] + [L] * 10)


def test_recognition_at_fpr_hand_example():
    res = recognition_at_fpr(HAND_PRED, HAND_SCORE, HAND_TRUE, alphas=(0.1, 0.2, 0.01), user_prior=0.01)
    assert list(res) == [0.1, 0.2]
    assert res.unresolved == (0.01,)  # 10 distractors cannot resolve 1 %

    # alpha = 0.1: k = 1, t just above 0.5 (2nd distractor). Accepted: a, c, d and distractor 0.95;
    # b (0.5) is rejected with the tied distractor.
    r = res[0.1]
    assert r["threshold"] == np.nextafter(0.5, np.inf)
    assert r["fpr"] == pytest.approx(0.1)
    assert r["recall"] == pytest.approx(2 / 4)
    assert r["wrong_rate"] == pytest.approx(1 / 4)
    assert r["precision"] == pytest.approx(2 / 4)  # a, d correct of a, c, d, distractor
    # prior pi = 0.01: 0.01*0.5 / (0.01*(0.5+0.25) + 0.99*0.1) = 0.005 / 0.1065
    assert r["precision_at_prior"] == pytest.approx(0.005 / 0.1065)
    assert (r["n_accepted"], r["n_correct"], r["n_wrong"], r["n_false_positives"]) == (4, 2, 1, 1)

    # alpha = 0.2: k = 2, t just above 0.45. Accepted: a, b, c, d and distractors 0.95, 0.5.
    r = res[0.2]
    assert r["fpr"] == pytest.approx(0.2)
    assert r["recall"] == pytest.approx(3 / 4)
    assert r["precision"] == pytest.approx(3 / 6)
    # 0.01*0.75 / (0.01*(0.75+0.25) + 0.99*0.2) = 0.0075 / 0.208
    assert r["precision_at_prior"] == pytest.approx(0.0075 / 0.208)


def test_recognition_all_wrong():
    pred = np.array([9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    score = np.array([0.9, 0.8, 0.7] + [0.1] * 10)
    true = np.array([1, 2, 3] + [L] * 10)
    r = recognition_at_fpr(pred, score, true, alphas=(0.1,))[0.1]
    # distractors all tie at 0.1 -> threshold above 0.1, none pass; the three wrong ones do.
    assert r["fpr"] == 0.0
    assert r["recall"] == 0.0
    assert r["precision"] == 0.0
    assert r["precision_at_prior"] == 0.0


def test_recognition_nothing_accepted_gives_nan_precision():
    # Top two distractors tie at 0.9 with k = 1: threshold above 0.9, landmarks score lower.
    pred = np.array([1, 2] + [0] * 10)
    score = np.array([0.5, 0.6, 0.9, 0.9] + [0.1] * 8)
    true = np.array([1, 2] + [L] * 10)
    r = recognition_at_fpr(pred, score, true, alphas=(0.1,))[0.1]
    assert r["n_accepted"] == 0
    assert r["recall"] == 0.0 and r["fpr"] == 0.0
    assert math.isnan(r["precision"])  # 0/0: documented as NaN, not a fake 1.0
    assert math.isnan(r["precision_at_prior"])


def test_recognition_no_distractors_all_unresolved():
    res = recognition_at_fpr([1, 2], [0.9, 0.8], [1, 2], alphas=(1e-2, 1e-3))
    assert dict(res) == {}
    assert res.unresolved == (1e-2, 1e-3)


def test_recognition_prior_none_and_bad_prior():
    res = recognition_at_fpr(HAND_PRED, HAND_SCORE, HAND_TRUE, alphas=(0.1,), user_prior=None)
    assert "precision_at_prior" not in res[0.1]
    with pytest.raises(ValueError):
        recognition_at_fpr(HAND_PRED, HAND_SCORE, HAND_TRUE, alphas=(0.1,), user_prior=0.0)


def test_no_prediction_is_never_accepted():
    # Landmark query whose nearest gallery item is a non-landmark: pred == NONLANDMARK.
    pred = np.array([L, 1] + [0] * 10)
    score = np.array([0.99, 0.9] + list(np.linspace(0.1, 0.5, 10)))
    true = np.array([1, 1] + [L] * 10)
    r = recognition_at_fpr(pred, score, true, alphas=(0.1,))[0.1]
    assert r["n_accepted"] == 2  # query 1 and the top distractor; not query 0
    assert r["recall"] == 0.5
    # not even at alpha = 1, where the threshold is -inf
    r = recognition_at_fpr(pred, score, true, alphas=(1.0,))[1.0]
    assert r["threshold"] == -math.inf
    assert r["n_accepted"] == 11 and r["fpr"] == 1.0


def test_input_validation():
    with pytest.raises(ValueError, match="lengths differ"):
        recognition_at_fpr([1, 2], [0.1], [1, 2])
    with pytest.raises(ValueError, match="integer"):
        gap([1.0], [0.1], [1])
    with pytest.raises(ValueError, match="NaN"):
        gap([1], [np.nan], [1])


# ----------------------------------------------------------------------------------------------
# GAP
# ----------------------------------------------------------------------------------------------


def test_gap_hand_example():
    # q0 true 1 pred 1 s .9 | q1 distractor pred 2 s .8 | q2 true 2 pred 3 s .7
    # q3 true 3 pred 3 s .6 | q4 true 4 pred 4 s .5
    # ranked: q0 rel (P=1/1), q1, q2, q3 rel (P=2/4), q4 rel (P=3/5); M = 4 landmark queries
    # GAP = (1 + 0.5 + 0.6) / 4 = 0.525
    pred = [1, 2, 3, 3, 4]
    score = [0.9, 0.8, 0.7, 0.6, 0.5]
    true = [1, L, 2, 3, 4]
    assert gap(pred, score, true) == pytest.approx(0.525)
    # order of the input does not matter (only scores do)
    perm = [4, 2, 0, 3, 1]
    assert gap(np.take(pred, perm), np.take(score, perm), np.take(true, perm)) == pytest.approx(0.525)


def test_gap_ties_are_stable_by_query_order():
    # equal scores: the earlier query is ranked first
    assert gap([1, 2], [0.5, 0.5], [1, L]) == pytest.approx(1.0)  # correct first: P(1)=1
    assert gap([2, 1], [0.5, 0.5], [L, 1]) == pytest.approx(0.5)  # distractor first: P(2)=1/2


def test_gap_edge_cases():
    assert math.isnan(gap([1, 2], [0.5, 0.4], [L, L]))  # M = 0
    assert gap([1, 2], [0.5, 0.4], [1, 2]) == 1.0
    assert gap([3, 3], [0.5, 0.4], [1, 2]) == 0.0
    # no prediction: not ranked, but still counted in M
    assert gap([L, 2], [0.9, 0.4], [1, 2]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# retrieval: P@1, mAP@k, top-1
# ----------------------------------------------------------------------------------------------

GALLERY_LABELS = np.array([0, 0, 1, 2, 2, 2])
QUERY_LABELS = np.array([0, 1, 2, 3, L])  # label 3 has no gallery item; last is a distractor
TOPK = np.array(
    [
        [2, 0, 1],  # labels 1 0 0 -> rel 0 1 1
        [2, -1, -1],  # labels 1 - - -> rel 1 0 0 (an approximate index found one neighbour)
        [0, 3, 5],  # labels 0 2 2 -> rel 0 1 1
        [3, 4, 5],
        [0, 1, 2],
    ]
)


def test_relevant_counts():
    assert relevant_counts(GALLERY_LABELS, QUERY_LABELS).tolist() == [2, 1, 3, 0, 0]
    assert relevant_counts([], [1, 2]).tolist() == [0, 0]


def test_precision_at_1_hand():
    # answerable queries: 0, 1, 2; top-1 correct only for query 1
    assert precision_at_1(GALLERY_LABELS, TOPK, QUERY_LABELS) == pytest.approx(1 / 3)
    assert math.isnan(precision_at_1(GALLERY_LABELS, TOPK[3:], QUERY_LABELS[3:]))


def test_map_at_k_hand():
    # AP@3: q0 = 1/min(3,2) * (1/2 + 2/3) = 0.58333; q1 = 1/1 * 1 = 1; q2 = 1/3 * (1/2 + 2/3)
    expected = (0.5 * (1 / 2 + 2 / 3) + 1.0 + (1 / 3) * (1 / 2 + 2 / 3)) / 3
    assert map_at_k(GALLERY_LABELS, TOPK, QUERY_LABELS, 3) == pytest.approx(expected)
    # AP@2: q0 = 1/2 * 1/2; q1 = 1; q2 = 1/2 * 1/2
    assert map_at_k(GALLERY_LABELS, TOPK, QUERY_LABELS, 2) == pytest.approx((0.25 + 1 + 0.25) / 3)
    # k = 1 is P@1
    assert map_at_k(GALLERY_LABELS, TOPK, QUERY_LABELS, 1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="columns"):
        map_at_k(GALLERY_LABELS, TOPK[:, :2], QUERY_LABELS, 3)
    with pytest.raises(ValueError):
        map_at_k(GALLERY_LABELS, TOPK, QUERY_LABELS, 0)


def test_top1_predictions():
    scores = np.array([[0.9, 0.1], [-np.inf, -np.inf], [0.5, 0.4]], dtype=np.float32)
    ids = np.array([[3, 0], [-1, -1], [0, 1]])
    pred, s = top1_predictions(GALLERY_LABELS, scores, ids)
    assert pred.tolist() == [2, L, 0]
    assert s.dtype == np.float32 and s[0] == np.float32(0.9) and s[1] == -np.inf
    with pytest.raises(ValueError):
        top1_predictions(GALLERY_LABELS, scores, np.array([[99, 0], [0, 0], [0, 0]]))


def test_precision_at_1_matches_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(0)
    gallery, g_labels, centers = clustered(rng, 60, 3000, 24, noise=1.2)
    # query classes 0..69: classes 60..69 have no gallery item ("lone" queries in PML's terms)
    centers_q = np.concatenate([centers, rng.standard_normal((10, 24))])
    query, q_labels, _ = clustered(rng, 70, 800, 24, noise=1.2, centers=centers_q)

    _, ids = search(build_index(gallery), query, 1)
    ours = precision_at_1(g_labels, ids, q_labels)

    calc = AccuracyCalculator(include=("precision_at_1",), k=1, device=torch.device("cpu"))
    pml = calc.get_accuracy(
        torch.from_numpy(query),
        torch.from_numpy(q_labels),
        torch.from_numpy(gallery),
        torch.from_numpy(g_labels),
        ref_includes_query=False,
    )["precision_at_1"]
    assert 0.2 < ours < 0.95  # a non-trivial regime
    assert ours == pytest.approx(pml, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# curve, evaluate_recognition, plots
# ----------------------------------------------------------------------------------------------


def test_precision_fpr_curve_hand():
    curve = precision_fpr_curve(HAND_PRED, HAND_SCORE, HAND_TRUE)
    assert isinstance(curve, PrecisionFprCurve)
    assert np.all(np.diff(curve.thresholds) < 0)
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.recall) >= 0)
    # the point accepting score >= 0.6 is the alpha = 0.1 operating point of the hand example
    j = int(np.flatnonzero(curve.thresholds == 0.6)[0])
    assert (curve.fpr[j], curve.recall[j], curve.precision[j]) == pytest.approx((0.1, 0.5, 0.5))
    # the tie at 0.5 (query b + a distractor) is one point, not two
    assert (curve.thresholds == 0.5).sum() == 1
    j = int(np.flatnonzero(curve.thresholds == 0.5)[0])
    assert (curve.fpr[j], curve.recall[j], curve.precision[j]) == pytest.approx((0.2, 0.75, 0.5))


def test_precision_fpr_curve_matches_recognition_at_fpr():
    rng = np.random.default_rng(1)
    n_l, n_d = 300, 2000
    true = np.r_[rng.integers(0, 20, n_l), np.full(n_d, L)]
    pred = np.where(rng.random(n_l + n_d) < 0.8, np.maximum(true, 0), rng.integers(0, 20, n_l + n_d))
    score = np.round(np.r_[rng.normal(0.7, 0.1, n_l), rng.normal(0.4, 0.1, n_d)], 3)  # ties
    curve = precision_fpr_curve(pred, score, true)
    res = recognition_at_fpr(pred, score, true, alphas=(1e-2, 1e-3, 5e-3))
    for row in res.values():
        # smallest curve threshold >= the FPR threshold has the same acceptances
        j = np.flatnonzero(curve.thresholds >= row["threshold"])[-1]
        assert curve.fpr[j] == pytest.approx(row["fpr"])
        assert curve.recall[j] == pytest.approx(row["recall"])
        assert curve.precision[j] == pytest.approx(row["precision"])


def _small_eval_data(seed=0):
    rng = np.random.default_rng(seed)
    gallery, g_labels, centers = clustered(rng, 40, 1500, 32, noise=0.9)
    query, q_labels, _ = clustered(rng, 40, 400, 32, noise=0.9, centers=centers)
    distractors = unit(rng.standard_normal((2500, 32)))
    return gallery, g_labels, query, q_labels, distractors


def test_evaluate_recognition_names_and_consistency():
    gallery, g_labels, query, q_labels, distractors = _small_eval_data()
    res = evaluate_recognition(
        gallery, g_labels, query, q_labels, distractors, alphas=(1e-2, 1e-3, 1e-4), k=5, user_prior=0.01
    )
    m = res.metrics
    expected = set()
    for a in ("1e-02", "1e-03"):
        expected |= {f"recall@fpr={a}", f"precision@fpr={a}", f"precision@fpr={a},prior=0.01",
                     f"threshold@fpr={a}", f"actual_fpr@fpr={a}"}
    expected |= {"gap", "p@1", "map@5", "n_gallery", "n_queries", "n_distractors", "n_queries_no_relevant",
                 "saturated_distractors"}
    assert set(m) == expected  # 1e-4 needs >= 10000 distractors: omitted
    assert res.unresolved_alphas == (1e-4,)
    assert (m["n_gallery"], m["n_queries"], m["n_distractors"]) == (1500, 400, 2500)

    # same numbers as the pure functions on a manual search
    index = build_index(gallery)
    qs, qi = search(index, query, 5)
    ds, di = search(index, distractors, 1)
    assert m["p@1"] == precision_at_1(g_labels, qi, q_labels)
    assert m["map@5"] == map_at_k(g_labels, qi, q_labels, 5)
    qp, qt = top1_predictions(g_labels, qs, qi)
    dp, dt = top1_predictions(g_labels, ds, di)
    pred, score = np.r_[qp, dp], np.r_[qt, dt]
    true = np.r_[q_labels, np.full(len(dp), L)]
    assert m["gap"] == gap(pred, score, true)
    row = recognition_at_fpr(pred, score, true, alphas=(1e-3,))[1e-3]
    assert m["recall@fpr=1e-03"] == row["recall"]
    assert m["precision@fpr=1e-03,prior=0.01"] == row["precision_at_prior"]
    assert m["actual_fpr@fpr=1e-03"] <= 1e-3

    # the per-query arrays reproduce the recognition metrics
    rebuilt = recognition_at_fpr(*res.as_predictions(), alphas=(1e-2, 1e-3))
    assert rebuilt[1e-3]["recall"] == pytest.approx(m["recall@fpr=1e-03"])
    assert rebuilt[1e-2]["precision"] == pytest.approx(m["precision@fpr=1e-02"])
    assert gap(*res.as_predictions()) == pytest.approx(m["gap"])


def test_evaluate_recognition_without_distractors():
    gallery, g_labels, query, q_labels, _ = _small_eval_data()
    res = evaluate_recognition(gallery, g_labels, query, q_labels, None, k=3)
    assert not any("@fpr" in name for name in res.metrics)
    assert res.metrics["n_distractors"] == 0
    assert 0 < res.metrics["p@1"] <= 1 and 0 < res.metrics["gap"] <= 1
    assert res.unresolved_alphas == (1e-2, 1e-3, 1e-4)


def test_evaluate_recognition_nonlandmark_queries_count_as_distractors():
    gallery, g_labels, query, q_labels, distractors = _small_eval_data()
    q_labels = q_labels.copy()
    q_labels[:50] = L
    res = evaluate_recognition(gallery, g_labels, query, q_labels, distractors[:950], alphas=(1e-3,))
    assert res.metrics["n_queries"] == 350 and res.metrics["n_distractors"] == 1000
    assert "recall@fpr=1e-03" in res.metrics


# ----------------------------------------------------------------------------------------------
# the collapse guard: distractors at near-duplicate scores
# ----------------------------------------------------------------------------------------------


def _normal_scores(rng, n_landmarks=300, n_distractors=2000):
    """Every landmark query right, top-1 score ~ N(2.5, 1); distractor scores ~ N(0, 1)."""
    score = np.concatenate([rng.normal(2.5, 1.0, n_landmarks), rng.normal(0.0, 1.0, n_distractors)]).astype(np.float32)
    return np.zeros(len(score), np.int64), score, np.r_[np.zeros(n_landmarks, np.int64), np.full(n_distractors, L)]


def test_recall_interval_is_the_binomial_one_when_the_threshold_cannot_move():
    # 1,000 distractors tied at 0: whatever the resample, the threshold admits none of them, so the
    # recall is a proportion of 400 queries with 200 above it: 0.5 ± 1.96 √(0.25 / 400) = [0.451, 0.549].
    score = np.r_[np.full(200, 0.9), np.full(200, -0.5), np.zeros(1000)].astype(np.float32)
    true = np.r_[np.zeros(400, np.int64), np.full(1000, L)]
    pred = np.zeros(1400, np.int64)
    assert recognition_at_fpr(pred, score, true, alphas=(1e-2,))[1e-2]["recall"] == 0.5
    low, high = recall_interval_at_fpr(pred, score, true, alphas=(1e-2,), resamples=2000)[1e-2]
    assert low == pytest.approx(0.451, abs=0.012) and high == pytest.approx(0.549, abs=0.012)


def test_recall_interval_matches_the_spread_of_fresh_evaluation_sets():
    # Recall at FPR 5e-3 of 2,000 distractors (the threshold above their 11th highest score) moves
    # by SD ~0.050 from one fresh evaluation set to the next, ~0.031 of it from the queries alone.
    # From a single set, the bootstrap's 95 % width / 3.92 must estimate the whole of it (averaged
    # over 20 sets: one set's estimate itself moves by ~20 %). Resampling only the queries, or
    # neither, fails this.
    rng = np.random.default_rng(0)
    fresh = [recognition_at_fpr(*_normal_scores(rng), alphas=(5e-3,), user_prior=None)[5e-3]["recall"]
             for _ in range(400)]
    widths = []
    for seed in range(20):
        low, high = recall_interval_at_fpr(*_normal_scores(rng), alphas=(5e-3,), resamples=300, seed=seed)[5e-3]
        widths.append((high - low) / 3.92)
    assert np.mean(widths) == pytest.approx(np.std(fresh), rel=0.2)


def test_recall_interval_contains_the_figure_is_seeded_and_checks_its_arguments():
    pred, score, true = _normal_scores(np.random.default_rng(1), n_landmarks=100, n_distractors=500)
    point = recognition_at_fpr(pred, score, true, alphas=(1e-2, 1e-3), user_prior=None)
    intervals = recall_interval_at_fpr(pred, score, true, alphas=(1e-2, 1e-3), resamples=200)
    assert list(intervals) == [1e-2]  # 1e-3 of 500 distractors is unresolved: omitted, as recognition_at_fpr does
    low, high = intervals[1e-2]
    assert low < point[1e-2]["recall"] < high
    assert recall_interval_at_fpr(pred, score, true, alphas=(1e-2,), resamples=200) == intervals
    assert recall_interval_at_fpr(pred, score, true, alphas=(1e-2,), resamples=200, seed=1) != intervals
    distractors_only = true == L
    assert all(map(math.isnan, recall_interval_at_fpr(pred[distractors_only], score[distractors_only],
                                                      true[distractors_only], alphas=(1e-2,))[1e-2]))
    assert recall_interval_at_fpr(pred[:100], score[:100], true[:100], alphas=(1e-2,)) == {}
    for bad in ({"level": 1.0}, {"level": 0.0}, {"resamples": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            recall_interval_at_fpr(pred, score, true, **bad)


def test_evaluate_recognition_adds_the_interval_when_asked():
    gallery, g_labels, query, q_labels, distractors = _small_eval_data()
    res = evaluate_recognition(gallery, g_labels, query, q_labels, distractors, alphas=(1e-2, 1e-3, 1e-4),
                               interval_resamples=200)
    intervals = recall_interval_at_fpr(*res.as_predictions(), alphas=(1e-2, 1e-3), resamples=200)
    for alpha, name in ((1e-2, "1e-02"), (1e-3, "1e-03")):
        assert (res.metrics[f"recall_low@fpr={name}"], res.metrics[f"recall_high@fpr={name}"]) == intervals[alpha]
        assert res.metrics[f"recall_low@fpr={name}"] < res.metrics[f"recall_high@fpr={name}"]
    assert "recall_low@fpr=1e-04" not in res.metrics  # unresolved, as its recall


def test_saturated_share_hand():
    scores = np.array([0.995, 0.99, 0.9899, -np.inf], np.float32)
    assert saturated_share(scores) == 0.5  # 0.99 itself counts; "no prediction" never does
    assert saturated_share(scores, at=0.9) == 0.75
    assert math.isnan(saturated_share(np.empty(0, np.float32)))


def _with_copies(n_copies: int):
    """_small_eval_data's sets plus ``n_copies`` distractors that are gallery photos (score 1.0)."""
    gallery, g_labels, query, q_labels, distractors = _small_eval_data()
    distractors = np.concatenate([distractors[: 1000 - n_copies], gallery[:n_copies]])
    return evaluate_recognition(gallery, g_labels, query, q_labels, distractors, alphas=(1e-2, 1e-3)).metrics


def test_saturation_is_reported_and_warned_where_a_threshold_lies_in_it():
    # 1000 distractors: FPR 1e-2 admits 10 of them, 1e-3 admits 1 (threshold just above the 2nd highest).
    healthy = _with_copies(0)
    assert healthy["saturated_distractors"] == 0 and saturation_warning(healthy) is None
    assert healthy["threshold@fpr=1e-03"] < 0.99  # random 32-d directions: no distractor near a gallery photo

    # 5 copies: the 2nd highest score is 1.0, so the threshold at 1e-3 lies among them; the 11th
    # highest is a random direction's, so the one at 1e-2 does not.
    five = _with_copies(5)
    assert five["saturated_distractors"] == 5 / 1000
    assert five["threshold@fpr=1e-03"] > 0.99 > five["threshold@fpr=1e-02"]
    assert saturation_warning(five) == (
        "5 of 1000 distractors (0.50%) match a gallery photo at cosine >= 0.99, so the threshold at FPR 1e-03 "
        "lies among near-duplicate scores: the embedding may have put some non-landmark photos on top of "
        "landmark photos (e.g. every dark photo at one point)")

    # 20 copies: both thresholds lie among them.
    twenty = _with_copies(20)
    assert twenty["saturated_distractors"] == 20 / 1000
    assert "so the threshold at FPR 1e-02, 1e-03 lies" in saturation_warning(twenty)


def test_no_distractors_no_saturation_figure():
    gallery, g_labels, query, q_labels, _ = _small_eval_data()
    m = evaluate_recognition(gallery, g_labels, query, q_labels, None).metrics
    assert math.isnan(m["saturated_distractors"]) and saturation_warning(m) is None
    assert saturation_warning({}) is None  # an older summary without the figure


def test_the_evaluation_callback_logs_the_figure_and_warns(caplog):
    from types import SimpleNamespace

    from pytorch_lightning.trainer.states import TrainerFn

    from callbacks.retrieval_evaluation import RetrievalEvaluation

    gallery, g_labels, query, q_labels, distractors = _small_eval_data()
    distractors = np.concatenate([distractors[:980], gallery[:20]])
    callback = RetrievalEvaluation(alphas=(1e-2, 1e-3), top_k=3, user_prior=None, plots=False)
    callback._gather = lambda: {"gallery": (gallery, g_labels, 0), "queries": (query, q_labels, 0),
                                "distractors": (distractors, np.full(len(distractors), L), 0)}
    trainer = SimpleNamespace(
        log_dir=None, default_root_dir=".", state=SimpleNamespace(fn=TrainerFn.FITTING), is_global_zero=True,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), current_epoch=4, global_step=0,
    )
    logged = {}
    module = SimpleNamespace(log_dict=lambda values, **kw: logged.update(values))
    with caplog.at_level("WARNING", logger="callbacks.retrieval_evaluation"):
        callback._finish(trainer, module, "val")
    assert logged["val/saturated_distractors"] == 20 / 1000
    for alpha in ("1e-02", "1e-03"):  # recall 0 among the near-duplicate scores: a point interval
        assert logged[f"val/recall_low@fpr={alpha}"] == logged[f"val/recall_high@fpr={alpha}"] == logged[f"val/recall@fpr={alpha}"] == 0
    [record] = [r for r in caplog.records if r.name == "callbacks.retrieval_evaluation"]
    assert record.getMessage().startswith("val, epoch 4: 20 of 1000 distractors (2.00%) match a gallery photo")


def test_the_evaluation_callback_logs_the_interval_of_1000_resamples():
    from types import SimpleNamespace

    from callbacks.retrieval_evaluation import RetrievalEvaluation
    from core.errors import UserError

    gallery, g_labels, query, q_labels, distractors = _small_eval_data()
    callback = RetrievalEvaluation(alphas=(1e-2, 1e-3), top_k=3, user_prior=None, plots=False)
    sets = {"gallery": (gallery, g_labels, 0), "queries": (query, q_labels, 0),
            "distractors": (distractors, np.full(len(distractors), L), 0)}
    trainer = SimpleNamespace(current_epoch=0)
    logged = callback._compute(trainer, sets, "val", None, "val")
    expected = evaluate_recognition(gallery, g_labels, query, q_labels, distractors, alphas=(1e-2, 1e-3), k=3,
                                    user_prior=None, interval_resamples=1000).metrics
    fewer = evaluate_recognition(gallery, g_labels, query, q_labels, distractors, alphas=(1e-2, 1e-3), k=3,
                                 user_prior=None, interval_resamples=200).metrics
    names = ("recall_low@fpr=1e-02", "recall_high@fpr=1e-02", "recall_low@fpr=1e-03", "recall_high@fpr=1e-03")
    assert [logged[n] for n in names] == [expected[n] for n in names] != [fewer[n] for n in names]
    off = RetrievalEvaluation(alphas=(1e-2,), top_k=3, user_prior=None, plots=False, recall_interval_resamples=0)
    assert not any(k.startswith("recall_low") for k in off._compute(trainer, sets, "val", None, "val"))
    with pytest.raises(UserError, match="recall_interval_resamples must be >= 0"):
        RetrievalEvaluation(recall_interval_resamples=-1)


def test_format_alpha():
    assert format_alpha(1e-3) == "1e-03"
    assert format_alpha(1e-2) == "1e-02"
    assert format_alpha(2.5e-4) == "2.5e-04"


def test_plots_render():
    gallery, g_labels, query, q_labels, distractors = _small_eval_data()
    res = evaluate_recognition(gallery, g_labels, query, q_labels, distractors)
    for fig in (plot_precision_fpr(res), plot_score_histograms(res)):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        assert buf.tell() > 1000
    assert plot_precision_fpr(res).axes[0].get_xscale() == "log"
    # no distractors: still a figure, not an exception
    res = evaluate_recognition(gallery, g_labels, query, q_labels, None)
    plot_precision_fpr(res).savefig(io.BytesIO(), format="png")
    plot_score_histograms(res).savefig(io.BytesIO(), format="png")
