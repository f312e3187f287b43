"""The non-landmark penalty of an index: hand-computed scores, the artifact round trip, and
`landmarks index --nonlandmark-pool` calibrating on penalised scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from index_probes import calibration_embeddings, tiny_index_args

from cli.main import main
from recognition.artifact import IndexFormatError, LandmarkIndex
from recognition.calibration import calibrate_threshold
from recognition.recognizer import Recognizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _index() -> LandmarkIndex:
    # Landmark "a" = mean of two photos along x, "b" = one photo along y (3-d embeddings).
    emb = _unit([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    return LandmarkIndex.from_embeddings(emb, ["a", "a", "b"], {"identity": {"embedding_size": 3}},
                                         representation="mean")


def test_scores_are_lowered_by_weight_times_the_mean_of_the_k_nearest_pool_cosines():
    index = _index()
    q = _unit([[3, 1, 2]])
    plain_scores, rows = index.search(q, 2)
    pool = _unit([[0, 0, 1], [1, 0, 1], [0, 1, 0], [-1, 0, 0]])
    index.set_penalty(pool, weight=0.5, k=2)
    cos = (q @ pool.T)[0]  # 0.535, 0.945, 0.267, -0.802: the 2 nearest are 0.945 and 0.535
    penalty = 0.5 * np.mean(np.sort(cos)[-2:])
    scores, rows2 = index.search(q, 2)
    assert np.array_equal(rows, rows2)
    np.testing.assert_allclose(scores, plain_scores - penalty, atol=1e-6)
    np.testing.assert_allclose(plain_scores[0], [q[0] @ _unit([[1, 0, 0]])[0], q[0] @ _unit([[0, 1, 0]])[0]], atol=1e-6)
    top_score, top_row = index.top1(q)
    assert top_row[0] == rows[0, 0] and top_score[0] == pytest.approx(scores[0, 0], abs=1e-6)
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        index.set_penalty(pool, weight=0.5, k=5)


def test_penalty_round_trip_and_a_damaged_header(tmp_path):
    index = _index()
    index.set_penalty(_unit([[0, 0, 1], [1, 0, 1]]), weight=0.25, k=1, source="pool.csv")
    out = index.save(tmp_path / "index")
    loaded = LandmarkIndex.load(out)
    assert np.array_equal(loaded.penalty["pool"], index.penalty["pool"])
    assert (loaded.penalty["weight"], loaded.penalty["k"], loaded.penalty["source"]) == (0.25, 1, "pool.csv")
    q = _unit([[1, 2, 3]])
    np.testing.assert_array_equal(loaded.search(q, 2)[0], index.search(q, 2)[0])
    head = json.loads((out / "index.json").read_text())
    head["nonlandmark_penalty"]["n_pool"] = 3
    (out / "index.json").write_text(json.dumps(head))
    with pytest.raises(IndexFormatError, match="3 non-landmark pool photos, penalty_pool.npy has 2"):
        LandmarkIndex.load(out)


def test_index_with_a_pool_calibrates_on_penalised_scores(tiny_world, tmp_path, capsys):
    out = tmp_path / "index"
    args = tiny_index_args(tiny_world, out)
    assert main(args + ["--nonlandmark-pool", str(tiny_world / "nonlandmarks.csv"), "--penalty-k", "3"]) == 0
    assert "penalty:    score − 0.25 × mean cosine to the 3 nearest of 40 non-landmark pool photos" in capsys.readouterr().out
    index = LandmarkIndex.load(out)
    emb = calibration_embeddings(Recognizer(index), tiny_world)
    scores, _ = index.top1(emb)  # embedded one by one here, in batches by the index: float noise only
    assert index.calibration.threshold == pytest.approx(calibrate_threshold(scores, 0.05).threshold, abs=1e-5)
    # The penalty is what the threshold saw: without it the calibration photos score higher.
    pool = index.penalty.pop("pool")
    index.penalty = None
    assert (index.top1(emb)[0] > scores).all() and len(pool) == 40

    # The pool must not contain the calibration photos: one line, exit 2.
    code = main(args + ["--nonlandmark-pool", str(tiny_world / "calibration.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("landmarks index: error: ")
    assert "also in the calibration set" in err[0]


def _lookalike_world(seed: int = 0) -> dict:
    """Landmark queries and distractors equally close to landmark 0 (cosine ~0.89), told apart only
    by the distractors' likeness to known non-landmark photos (the pool, along e2)."""
    rng = np.random.default_rng(seed)
    e = np.eye(5, dtype=np.float32)
    noise = lambda n: 0.02 * rng.standard_normal((n, 5)).astype(np.float32)  # noqa: E731
    gallery = _unit(np.concatenate([np.tile(e[0], (5, 1)), np.tile(e[1], (5, 1))]) + noise(10))
    queries = _unit(np.tile(e[0] + 0.5 * e[3], (20, 1)) + noise(20))
    lookalikes = lambda n: _unit(np.tile(e[0] + 0.5 * e[2], (n, 1)) + noise(n))  # noqa: E731
    return dict(gallery_emb=gallery, gallery_labels=np.repeat([0, 1], 5), query_emb=queries,
                query_labels=np.zeros(20, np.int64), distractor_emb=lookalikes(200), calibration_emb=lookalikes(100),
                alphas=[0.1], user_prior=None, pool=_unit(np.tile(e[2], (30, 1)) + noise(30)))


def test_the_evaluation_scores_the_penalised_index_and_its_control():
    from recognition.artifact import PenaltyParams
    from recognition.evaluation import evaluate_centroid_index

    sets = _lookalike_world()
    pool = sets.pop("pool")
    plain = evaluate_centroid_index(**sets)
    shipped = evaluate_centroid_index(**sets, penalty_pool_emb=pool, penalty=PenaltyParams(weight=0.25, k=1))
    # The control is exactly the index without a penalty.
    assert {k.removeprefix("no_penalty/"): v for k, v in shipped.items() if k.startswith("no_penalty/")} == {
        k: v for k, v in plain.items() if not k.startswith(("n_", "dropped_"))}
    # Without the penalty, queries and look-alikes tie near 0.89 and a 10 % FPR costs most of the
    # recall; with it, the look-alikes lose 0.25 x ~0.45 and every query passes.
    assert plain["recall@fpr=1e-01"] < 0.5
    assert shipped["recall@fpr=1e-01"] == 1.0 and shipped["actual_fpr@fpr=1e-01"] <= 0.1
    # The threshold is calibrated on penalised scores, computed here by hand: a landmark of so few
    # photos keeps each photo, a score is the cosine to the best of them minus 0.25 x the cosine to
    # the nearest pool photo.
    vectors = sets["gallery_emb"]
    cal = sets["calibration_emb"]
    by_hand = (cal @ vectors.T).max(1) - 0.25 * (cal @ pool.T).max(1)
    assert shipped["threshold@fpr=1e-01"] == pytest.approx(calibrate_threshold(by_hand, 0.1).threshold, abs=1e-5)
