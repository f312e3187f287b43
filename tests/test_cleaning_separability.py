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
    # Class A: two images near e0 and a stray near e1; class B: two images near e1; pool near e2.
    c = np.cos(0.1)
    s = np.sin(0.1)
    emb = np.array([
        [1, 0, 0],      # A
        [c, s, 0],      # A
        [0, 1, 0],      # A: stray, really B
        [0, c, s],      # B
        [s, c, 0],      # B
    ], dtype=np.float32)
    labels = ["A", "A", "A", "B", "B"]
    pool = np.array([[0, 0, 1.0]], dtype=np.float32)
    out = evidence_scores(emb * 3.0, labels, pool, k=2)  # scale must not matter
    sim = emb @ emb.T
    # stray (row 2): own = mean(sim[2,0], sim[2,1]); other = mean(sim[2,3], sim[2,4]); pool = 0
    assert out["own"][2] == pytest.approx((sim[2, 0] + sim[2, 1]) / 2, abs=1e-6)
    assert out["other"][2] == pytest.approx((sim[2, 3] + sim[2, 4]) / 2, abs=1e-6)
    assert out["pool"][2] == pytest.approx(0.0, abs=1e-6)
    assert out["pool"][3] == pytest.approx(s, abs=1e-6)
    # row 0: own = mean of its 2 classmates (never itself)
    assert out["own"][0] == pytest.approx((sim[0, 1] + sim[0, 2]) / 2, abs=1e-6)
    assert out["evidence"][2] == pytest.approx(max(out["other"][2], out["pool"][2]) - out["own"][2])
    assert np.argmax(out["evidence"]) == 2
    # An image alone in its class has no own evidence: own = -1.
    alone = evidence_scores(emb, ["A", "A", "A", "B", "C"], pool, k=2)
    assert alone["own"][4] == -1.0
    with pytest.raises(ValueError, match="finite"):
        evidence_scores(np.vstack([emb[:4], [[np.nan, 0, 0]]]), labels)
