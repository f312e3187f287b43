"""cleaning.separability: evidence scores and the precision-recall ceiling, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cleaning.separability import evidence_scores, precision_at_recall, precision_recall_curve


def test_precision_recall_curve_by_hand():
    # scores descending: 0.9 (noise), 0.8 (clean), 0.7 (noise), 0.7 (clean, tied), 0.1 (noise)
    scores = np.array([0.7, 0.9, 0.1, 0.8, 0.7])
    noise = np.array([1, 1, 1, 0, 0], dtype=bool)
    precision, recall = precision_recall_curve(scores, noise)
    # thresholds 0.9, 0.8, 0.7 (both tied rows at once), 0.1
    np.testing.assert_allclose(precision, [1 / 1, 1 / 2, 2 / 4, 3 / 5])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 3 / 3])
    # recall >= 0.6: thresholds 0.7 (precision 0.5) and 0.1 (0.6) qualify; the better one counts
    assert precision_at_recall(scores, noise, 0.6) == pytest.approx(0.6)
    assert precision_at_recall(scores, noise, 0.3) == pytest.approx(1.0)
    assert precision_at_recall(scores, noise, 1.0) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no noisy rows"):
        precision_recall_curve(scores, np.zeros(5, dtype=bool))


def test_evidence_scores_by_hand():
    # Class A: a0, a1 and a stray a2 that looks like class B; class B: b3, b4; pool: p5, p6.
    emb = np.array([
        [1.0, 0.0, 0.0],  # a0  A
        [0.8, 0.6, 0.0],  # a1  A
        [0.0, 1.0, 0.0],  # a2  A: stray, really B
        [0.0, 0.8, 0.6],  # b3  B
        [0.6, 0.8, 0.0],  # b4  B
    ], dtype=np.float32)
    labels = ["A", "A", "A", "B", "B"]
    pool = np.array([[0.0, 0.6, 0.8], [0.0, 0.0, 1.0]], dtype=np.float32)
    # Cosines:  a0·a1 .8  a0·a2 0   a0·b3 0    a0·b4 .6
    #           a1·a2 .6  a1·b3 .48 a1·b4 .96  a2·b3 .8  a2·b4 .8  b3·b4 .64
    #           pool: nearest of p5, p6: a0 max(0, 0) = 0, a1 max(.36, 0) = .36, a2 max(.6, 0) = .6,
    #                 b3 max(.96, .6) = .96, b4 max(.48, 0) = .48
    # k = 2, own/other = mean of the (at most) 2 largest, never the row itself:
    #   a0: own (.8 + 0)/2 = .4    other (.6 + 0)/2 = .3      pool 0   evidence max(.3, 0) - .4 = -.1
    #   a1: own (.8 + .6)/2 = .7   other (.96 + .48)/2 = .72  pool .36  evidence .72 - .7 = .02
    #   a2: own (0 + .6)/2 = .3    other (.8 + .8)/2 = .8     pool .6   evidence .8 - .3 = .5
    #   b3: own .64 (one classmate: the mean of what exists)  other (.8 + .48)/2 = .64  pool .96
    #                                                                    evidence .96 - .64 = .32
    #   b4: own .64                other (.96 + .8)/2 = .88   pool .48  evidence .88 - .64 = .24
    scale = np.array([[3.0], [0.5], [2.0], [1.0], [7.0]], dtype=np.float32)  # lengths must not matter
    out = evidence_scores(emb * scale, labels, pool * 4.0, k=2)
    np.testing.assert_allclose(out["own"], [0.4, 0.7, 0.3, 0.64, 0.64], atol=1e-6)
    np.testing.assert_allclose(out["other"], [0.3, 0.72, 0.8, 0.64, 0.88], atol=1e-6)
    np.testing.assert_allclose(out["pool"], [0.0, 0.36, 0.6, 0.96, 0.48], atol=1e-6)
    np.testing.assert_allclose(out["evidence"], [-0.1, 0.02, 0.5, 0.32, 0.24], atol=1e-6)
    assert np.argmax(out["evidence"]) == 2  # the stray scores highest
    # Without a pool, pool = -1 and evidence = other - own: b3 becomes .64 - .64 = 0.
    no_pool = evidence_scores(emb, labels, k=2)
    np.testing.assert_allclose(no_pool["pool"], [-1.0] * 5)
    np.testing.assert_allclose(no_pool["evidence"], [-0.1, 0.02, 0.5, 0.0, 0.24], atol=1e-6)
    # b3 and b4 alone in classes B and C: own = -1; other = mean of the 2 nearest of all the rest:
    #   b3: (.8 + .64)/2 = .72, evidence max(.72, .96) + 1 = 1.96;  b4: (.96 + .8)/2 = .88, evidence 1.88.
    alone = evidence_scores(emb, ["A", "A", "A", "B", "C"], pool, k=2)
    np.testing.assert_allclose(alone["own"], [0.4, 0.7, 0.3, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(alone["other"][3:], [0.72, 0.88], atol=1e-6)
    np.testing.assert_allclose(alone["evidence"][3:], [1.96, 1.88], atol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        evidence_scores(np.vstack([emb[:4], [[np.nan, 0, 0]]]), labels)
