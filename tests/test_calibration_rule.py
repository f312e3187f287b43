"""The calibration rules: ``empirical`` (at most the target share of these photos) and
``conformal`` (at most the target rate of new photos, in expectation)."""

from __future__ import annotations

import numpy as np
import pytest

from callbacks.retrieval_evaluation import RetrievalEvaluation
from core.errors import UserError
from recognition.artifact import LandmarkIndex
from recognition.calibration import Calibration, CalibrationError, calibrate_threshold
from recognition.centroids import CentroidParams
from recognition.evaluation import evaluate_centroid_index
from retrieval.decision import accepts, conformal_threshold


def test_how_many_calibration_photos_each_rule_admits():
    scores = np.random.default_rng(0).permutation(np.arange(2000, dtype=np.float32) / 2000)
    # empirical: floor(1e-3 * 2000) = 2 admitted; conformal: floor(1e-3 * 2001) - 1 = 1
    empirical = calibrate_threshold(scores, 1e-3)
    conformal = calibrate_threshold(scores, 1e-3, rule="conformal")
    assert (empirical.rule, empirical.n_false_positives) == ("empirical", 2)
    assert (conformal.rule, conformal.n_false_positives, conformal.resolved) == ("conformal", 1, True)
    # the threshold sits just above the 2nd highest score (1998/2000): only the highest passes
    assert 1998 / 2000 < conformal.threshold <= np.nextafter(np.float32(1998 / 2000), np.float32(1))
    assert accepts(scores, conformal.threshold).sum() == 1
    # 3,999 photos: floor(4) - 1 = 3 (empirical: floor(3.999) = 3); 4,000: 3 and 4
    assert calibrate_threshold(np.arange(3999.0), 1e-3, rule="conformal").n_false_positives == 3
    assert calibrate_threshold(np.arange(4000.0), 1e-3, rule="conformal").n_false_positives == 3
    assert calibrate_threshold(np.arange(4000.0), 1e-3).n_false_positives == 4


def test_conformal_resolves_one_photo_fewer_and_admits_none_there():
    # 999 photos: (0 + 1) / 1000 <= 1e-3, so the threshold that admits none keeps the promise
    cal = calibrate_threshold(np.arange(999.0), 1e-3, rule="conformal")
    assert (cal.resolved, cal.n_false_positives) == (True, 0)
    with pytest.raises(CalibrationError, match="at least 1000 non-landmark images"):
        calibrate_threshold(np.arange(999.0), 1e-3)  # empirical needs 1 / FPR
    with pytest.raises(CalibrationError, match=r"at least 999 non-landmark images \(1/FPR - 1, conformal rule\)"):
        calibrate_threshold(np.arange(998.0), 1e-3, rule="conformal")
    unresolved = calibrate_threshold(np.arange(998.0), 1e-3, rule="conformal", allow_unresolved=True)
    assert (unresolved.resolved, unresolved.n_false_positives) == (False, 0)
    assert conformal_threshold(np.arange(998.0), 1e-3) is None


def test_conformal_rejects_a_tied_group_conservatively():
    scores = np.array([0.1, 0.2, 0.9, 0.9, 0.9] + [0.0] * 395, dtype=np.float32)  # 400 photos, FPR 0.01
    # conformal k = floor(4.01) - 1 = 3; the three tied at the top pass together (3 <= 3)
    assert calibrate_threshold(scores, 0.01, rule="conformal").n_false_positives == 3
    # at 0.005: k = floor(2.005) - 1 = 1, but 3 tie at the top: none passes
    assert calibrate_threshold(scores, 0.005, rule="conformal").n_false_positives == 0


def test_on_new_photos_conformal_keeps_the_target_in_expectation_and_empirical_does_not():
    """Uniform scores: a threshold t passes a new photo with probability 1 - t. Over many draws of
    200 calibration photos at FPR 0.01, empirical admits 2 (expected rate 3/201 = 0.0149) and
    conformal 1 (2/201 = 0.00995 <= 0.01)."""
    rng = np.random.default_rng(1)
    draws = rng.random((20000, 200))
    rate = {rule: np.array([1 - calibrate_threshold(d, 0.01, rule=rule).threshold for d in draws])
            for rule in ("empirical", "conformal")}
    se = {rule: r.std() / np.sqrt(len(r)) for rule, r in rate.items()}  # ~6e-5
    assert rate["conformal"].mean() == pytest.approx(2 / 201, abs=4 * se["conformal"])
    assert rate["conformal"].mean() <= 0.01 + 2 * se["conformal"]
    assert rate["empirical"].mean() == pytest.approx(3 / 201, abs=4 * se["empirical"])
    assert rate["empirical"].mean() > 0.014


def test_the_rule_is_recorded_and_old_records_read_as_empirical():
    cal = calibrate_threshold(np.arange(2000.0), 1e-3, rule="conformal")
    assert Calibration.from_json(cal.to_json()) == cal
    old = {k: v for k, v in calibrate_threshold(np.arange(2000.0), 1e-3).to_json().items() if k != "rule"}
    assert Calibration.from_json(old).rule == "empirical"


def test_a_misspelt_rule_is_a_user_error():
    with pytest.raises(UserError, match="calibration rule must be one of empirical, conformal, got 'conform'"):
        calibrate_threshold(np.arange(2000.0), 1e-3, rule="conform")
    with pytest.raises(UserError, match="calibration rule must be one of"):
        RetrievalEvaluation(centroid_index=True, calibration_rule="conform")


def test_the_evaluation_calibrates_the_shipped_index_by_the_rule_it_is_given():
    """evaluate_centroid_index's threshold is calibrate_threshold's, by the same rule, on the
    calibration photos' top-1 scores against the same centroid index."""
    rng = np.random.default_rng(2)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    gallery = unit(rng.normal(size=(4, 16)).repeat(5, axis=0) + 0.05 * rng.normal(size=(20, 16)))
    labels = np.arange(4).repeat(5)
    queries = unit(gallery[::5] + 0.05 * rng.normal(size=(4, 16)))
    calibration = unit(rng.normal(size=(250, 16)))  # 0.01: empirical admits 2, conformal 1 (floor(2.51) - 1)
    distractors = unit(rng.normal(size=(100, 16)))
    params = CentroidParams(few_photos=0)
    index = LandmarkIndex.from_embeddings(gallery, [str(x) for x in labels], params=params)
    by_hand = index.top1(calibration)[0]
    thresholds = {}
    for rule in ("empirical", "conformal"):
        figures = evaluate_centroid_index(gallery, labels, queries, labels[::5], distractors, alphas=(0.01,),
                                          calibration_emb=calibration, params=params, calibration_rule=rule)
        thresholds[rule] = figures["threshold@fpr=1e-02"]
        assert thresholds[rule] == pytest.approx(calibrate_threshold(by_hand, 0.01, rule=rule).threshold, abs=1e-6)
    assert thresholds["conformal"] > thresholds["empirical"]  # one calibration photo fewer passes
