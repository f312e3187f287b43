"""RetrievalEvaluation(centroid_index=True) logs the decision that ships: Recognizer over the centroid index."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pytorch_lightning.trainer.states import TrainerFn

from callbacks.retrieval_evaluation import RetrievalEvaluation
from core.labels import NONLANDMARK
from recognition.artifact import LandmarkIndex, PenaltyParams
from recognition.calibration import calibrate_threshold
from recognition.centroids import CentroidParams, build_representation
from recognition.evaluation import evaluate_centroid_index
from recognition.recognizer import Recognizer
from retrieval.metrics import evaluate_recognition, recognition_at_fpr

L = NONLANDMARK
D = 8
E = np.eye(D)
ALPHAS = (0.2, 0.1, 1e-3)  # 11 non-landmark rows: 2 and 1 false positives allowed; 1e-3 unresolved
# The hand-worked world below is about clustering, and its landmarks have 3-6 photos: every one is
# clustered (the default keeps the photos of a landmark with fewer than 15).
CLUSTER = CentroidParams(few_photos=0)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def angle(i, j):
    """Three photos of one shooting angle: e_i and e_i tilted either way towards e_j (mean: e_i)."""
    return unit([E[i], E[i] + 0.1 * E[j], E[i] - 0.1 * E[j]])


@pytest.fixture
def world():
    """A noisy landmark DB where the kNN and the centroid decisions differ, computable by hand.

    Gallery: landmark 10 = three photos around e0 plus a mislabelled photo at e5 (a generic
    building, no landmark); landmark 11 = a front view around e1 and a side view around e2;
    landmark 12 = three photos around e3. The centroid index (cut 0.3, clusters >= 3 photos)
    holds e0, e1, e2, e3 exactly and drops the lone e5 photo.

    Queries (top-1 cosine, the same in both indexes): 10 at 0.894, 11 (side view) at 0.894,
    12 at 0.819, 11 between e1 and e3 at 0.743, and a non-landmark query at 0.330 (to e2).
    Distractors: five look like the generic building, e5 + c e4 (c = .1 .. .5): kNN scores
    0.995 .. 0.894 against the mislabelled photo, 0 against the centroids; five others, e6 + d e0
    (d = .3 .. .1): centroid scores 0.287, 0.243, 0.196, 0.148, 0.100.
    """
    gallery = np.concatenate([angle(0, 6), unit(E[5])[None], angle(1, 7), angle(2, 7), angle(3, 6)])
    g_labels = np.array([10] * 4 + [11] * 6 + [12] * 3)
    queries = unit([E[0] + 0.5 * E[4], E[2] + 0.5 * E[4], E[3] + 0.7 * E[4], E[1] + 0.9 * E[3], E[4] + 0.35 * E[2]])
    q_labels = np.array([10, 11, 12, 11, L])
    distractors = unit([E[5] + c * E[4] for c in (0.1, 0.2, 0.3, 0.4, 0.5)]
                       + [E[6] + d * E[0] for d in (0.3, 0.25, 0.2, 0.15, 0.1)])
    return gallery, g_labels, queries, q_labels, distractors


def recognizer_figures(world, alpha):
    """Recall, FPR, precision of what `landmarks index` + `landmarks recognize` would do, photo by photo."""
    gallery, g_labels, queries, q_labels, distractors = world
    # run_index_command: build_representation -> LandmarkIndex.from_centroids -> top1 -> calibrate_threshold
    index = LandmarkIndex.from_centroids(
        build_representation(gallery, [str(x) for x in g_labels], "centroids", CLUSTER),
        {"identity": {"embedding_size": D}},
    )
    nonlandmarks = np.concatenate([distractors, queries[q_labels == L]])
    index.calibration = calibrate_threshold(index.top1(nonlandmarks)[0], alpha)
    recognizer = Recognizer.__new__(Recognizer)  # no network: only decide() is used
    recognizer.index, recognizer.threshold = index, index.threshold
    recognizer.gps_radius_km, recognizer.gps, recognizer.use_exif_gps = None, {}, False
    recognizer.top_k = 5  # candidates reported, as Recognizer's default
    photos = np.concatenate([queries, distractors])
    truth = np.concatenate([q_labels, np.full(len(distractors), L)])
    scores, rows = index.search(photos, 5)
    n = {"correct": 0, "wrong": 0, "fp": 0}
    for j, true in enumerate(truth):
        r = recognizer.decide(f"photo{j}.jpg", scores[j], rows[j])
        if r.accepted:
            n["fp" if true == L else "correct" if r.landmark_id == str(true) else "wrong"] += 1
    n_landmark, n_nonlandmark = int((truth != L).sum()), int((truth == L).sum())
    accepted = n["correct"] + n["wrong"] + n["fp"]
    return {
        "recall": n["correct"] / n_landmark,
        "actual_fpr": n["fp"] / n_nonlandmark,
        "precision": n["correct"] / accepted if accepted else float("nan"),
        "threshold": index.threshold,
        "n_vectors": len(index),
    }


def _run_callback(world):
    gallery, g_labels, queries, q_labels, distractors = world
    callback = RetrievalEvaluation(alphas=ALPHAS, top_k=3, user_prior=None, plots=False, centroid_index=True,
                                   centroid_params={"few_photos": 0})
    callback._gather = lambda: {"gallery": (gallery, g_labels, 0), "queries": (queries, q_labels, 0),
                                "distractors": (distractors, np.full(len(distractors), L), 0)}
    logged = {}
    trainer = SimpleNamespace(
        log_dir=None, default_root_dir=".", state=SimpleNamespace(fn=TrainerFn.VALIDATING), is_global_zero=True,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), current_epoch=0, global_step=0,
    )
    module = SimpleNamespace(log_dict=lambda values, **kw: logged.update(values))
    callback._finish(trainer, module, "val")
    return logged


def test_logged_centroid_metrics_are_the_recognizer_decisions(world):
    logged = _run_callback(world)
    for alpha, a in ((0.2, "2e-01"), (0.1, "1e-01")):
        shipped = recognizer_figures(world, alpha)
        assert logged[f"val/centroid/recall@fpr={a}"] == shipped["recall"]
        assert logged[f"val/centroid/actual_fpr@fpr={a}"] == shipped["actual_fpr"]
        assert logged[f"val/centroid/precision@fpr={a}"] == shipped["precision"]
        assert logged[f"val/centroid/threshold@fpr={a}"] == shipped["threshold"]
    assert logged["val/centroid/n_vectors"] == recognizer_figures(world, 0.1)["n_vectors"] == 4
    assert logged["val/centroid/dropped_images"] == 1  # the mislabelled photo
    assert "val/centroid/recall@fpr=1e-03" not in logged  # 11 non-landmark rows cannot resolve it
    assert {"val/gap", "val/p@1", "val/centroid/gap", "val/centroid/p@1"} <= set(logged)


def test_hand_computed_figures(world):
    """The module docstring of the fixture, worked through at FPR 0.1 (one false positive allowed)."""
    m = evaluate_centroid_index(*world, alphas=(0.2, 0.1), user_prior=None, params=CLUSTER)
    knn = evaluate_recognition(*world, alphas=(0.2, 0.1), user_prior=None).metrics
    # centroids: the non-landmark scores are 0.330, 0.287, 0.243, ...; t is just above 0.287, so the
    # non-landmark query is the one false positive and all four landmark queries are accepted.
    assert m["threshold@fpr=1e-01"] == float(np.nextafter(np.float32(unit(E[6] + 0.3 * E[0])[0]), np.float32(1)))
    assert (m["recall@fpr=1e-01"], m["actual_fpr@fpr=1e-01"], m["precision@fpr=1e-01"]) == (1.0, 1 / 11, 4 / 5)
    # two allowed: 0.330 and 0.287 pass, 0.243 does not
    assert (m["recall@fpr=2e-01"], m["actual_fpr@fpr=2e-01"], m["precision@fpr=2e-01"]) == (1.0, 2 / 11, 4 / 6)
    # kNN: the generic-building distractors hit the mislabelled photo at 0.995, 0.981, 0.958: the
    # threshold lands above 0.981 (0.958 with two allowed) and no landmark query reaches it.
    assert 0.980 < knn["threshold@fpr=1e-01"] < 0.981 and 0.957 < knn["threshold@fpr=2e-01"] < 0.958
    assert (knn["recall@fpr=1e-01"], knn["actual_fpr@fpr=1e-01"], knn["precision@fpr=1e-01"]) == (0.0, 1 / 11, 0.0)
    assert (knn["recall@fpr=2e-01"], knn["precision@fpr=2e-01"]) == (0.0, 0.0)
    assert m["p@1"] == knn["p@1"] == 1.0
    assert (m["n_vectors"], m["n_landmarks"], m["dropped_images"]) == (4, 3, 1)


def test_centroid_evaluation_is_recognition_at_fpr_on_the_centroid_top1(world):
    """Calibrating like `landmarks index` and thresholding like the kNN metrics give the same figures."""
    gallery, g_labels, queries, q_labels, distractors = world
    m = evaluate_centroid_index(gallery, g_labels, queries, q_labels, distractors, alphas=ALPHAS, user_prior=0.01,
                                params=CLUSTER)
    index = LandmarkIndex.from_embeddings(gallery, [str(x) for x in g_labels], params=CLUSTER)
    score, row = index.top1(np.concatenate([queries, distractors]))
    pred = np.array(index.landmark_ids, dtype=np.int64)[row]
    true = np.concatenate([q_labels, np.full(len(distractors), L)])
    res = recognition_at_fpr(pred, score, true, alphas=ALPHAS, user_prior=0.01)
    assert res.unresolved == (1e-3,)
    for alpha, a in ((0.2, "2e-01"), (0.1, "1e-01")):
        assert m[f"recall@fpr={a}"] == res[alpha]["recall"]
        assert m[f"threshold@fpr={a}"] == res[alpha]["threshold"]
        assert m[f"precision@fpr={a},prior=0.01"] == res[alpha]["precision_at_prior"]


def test_centroid_evaluation_uses_the_rule(world, monkeypatch):
    import recognition.evaluation
    import retrieval.decision

    seen = []

    def spy(scores, labels, threshold, allowed=None):
        seen.append(np.asarray(scores).shape)
        return retrieval.decision.decide(scores, labels, threshold, allowed)

    monkeypatch.setattr(recognition.evaluation, "decide", spy)
    evaluate_centroid_index(*world, alphas=(0.2, 0.1))
    assert seen == [(len(world[2]) + len(world[4]), 5)] * 2  # every photo, Recognizer's 5 candidates


def test_gallery_nonlandmark_rows_are_left_out_and_empty_gallery_refused(world):
    gallery, g_labels, queries, q_labels, distractors = world
    with_noise = np.concatenate([gallery, unit(np.eye(D)[6])[None]])
    labels = np.concatenate([g_labels, [L]])
    a = evaluate_centroid_index(with_noise, labels, queries, q_labels, distractors, alphas=(0.1,))
    b = evaluate_centroid_index(gallery, g_labels, queries, q_labels, distractors, alphas=(0.1,))
    assert a == pytest.approx(b, nan_ok=True)
    with pytest.raises(ValueError, match="no landmark images"):
        evaluate_centroid_index(gallery, np.full(len(gallery), L), queries, q_labels, distractors)


def test_the_callback_logs_the_penalised_index_with_its_control(world):
    from core.errors import UserError

    gallery, g_labels, queries, q_labels, distractors = world
    pool = unit([E[5], E[6]])  # known non-landmarks: the generic building and the e6 scenes
    callback = RetrievalEvaluation(alphas=ALPHAS, top_k=3, user_prior=None, plots=False, centroid_index=True,
                                   centroid_params={"few_photos": 0}, nonlandmark_penalty={"weight": 0.5})
    callback._gather = lambda: {"gallery": (gallery, g_labels, 0), "queries": (queries, q_labels, 0),
                                "distractors": (distractors, np.full(len(distractors), L), 0),
                                "nonlandmark_pool": (pool, np.full(2, L), 0)}
    logged = {}
    trainer = SimpleNamespace(
        log_dir=None, default_root_dir=".", state=SimpleNamespace(fn=TrainerFn.VALIDATING), is_global_zero=True,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), current_epoch=0, global_step=0,
    )
    callback._finish(trainer, SimpleNamespace(log_dict=lambda values, **kw: logged.update(values)), "val")
    control = _run_callback(world)  # the same callback without the penalty
    for name, value in control.items():
        if name.startswith("val/centroid/") and not name.startswith(("val/centroid/n_", "val/centroid/dropped_")):
            assert logged[name.replace("val/centroid/", "val/centroid/no_penalty/")] == value
    expected = evaluate_centroid_index(*world, alphas=ALPHAS, user_prior=None, params=CLUSTER, penalty_pool_emb=pool,
                                       penalty=PenaltyParams(weight=0.5))
    assert logged["val/centroid/threshold@fpr=1e-01"] == expected["threshold@fpr=1e-01"]
    # Every distractor is within cosine 0.89 of a pool photo, so lowered by >= 0.44, while the queries
    # (orthogonal to e5 and e6) keep their scores: the threshold drops.
    assert logged["val/centroid/threshold@fpr=1e-01"] < control["val/centroid/threshold@fpr=1e-01"]

    with pytest.raises(UserError, match="set centroid_index: true"):
        RetrievalEvaluation(nonlandmark_penalty={})
    datamodule = SimpleNamespace(eval_set_names=("gallery", "queries", "distractors"), eval_dataset=lambda name: [0])
    with pytest.raises(UserError, match="data.evaluate_nonlandmark_pool: true"):
        callback._start(SimpleNamespace(datamodule=datamodule), "val")
