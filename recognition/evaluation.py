"""The decision that ships, scored on an evaluation set: the centroid index of ``landmarks index``.

:func:`retrieval.metrics.evaluate_recognition` decides over every gallery image (kNN); a user of
``landmarks recognize`` gets :class:`recognition.Recognizer` over a centroid index instead. Both
apply one rule (:func:`retrieval.decision.decide`), but on different candidates, so their figures
differ. :func:`evaluate_centroid_index` reproduces the shipped path from embeddings:

1. build the index ``landmarks index`` builds from the gallery embeddings
   (:meth:`LandmarkIndex.from_embeddings`: shooting-angle centroids with the
   :class:`~recognition.centroids.CentroidParams` defaults, exact flat index); gallery rows
   labelled ``NONLANDMARK`` are left out, as a landmark database has none;
2. for each alpha, calibrate the threshold as ``landmarks index --nonlandmarks --target-fpr alpha``
   does: the non-landmark photos' top-1 scores against the index (those of
   :meth:`LandmarkIndex.top1`, read off the search of step 3) →
   :func:`recognition.calibration.calibrate_threshold`. The non-landmark photos are the
   evaluation's distractors (plus queries labelled ``NONLANDMARK``), the rows the kNN figures
   calibrate on too. An alpha they cannot resolve is left out, as in the kNN figures
   (``calibrate_threshold`` refuses it), and so is ``alpha = 1`` (the command refuses it);
3. decide every query and distractor as :meth:`Recognizer.decide` does without a GPS filter:
   top ``top_k`` distinct landmarks (:meth:`LandmarkIndex.search`), empty slots disallowed,
   :func:`retrieval.decision.decide` at that threshold;
4. count the decisions with :func:`retrieval.metrics.score_decisions`, the counting of the kNN
   figures.

Metric names are those of :mod:`retrieval.metrics` (``recall@fpr=1e-03``, ``gap``, ``p@1``, ...;
``p@1`` = the top-1 landmark is right, over queries whose landmark is in the index), plus
``n_vectors`` (centroids indexed), ``n_landmarks`` and ``dropped_images`` (gallery images in
clusters dropped as too small). With a non-landmark penalty pool, every score of steps 2–3 is the
penalised one (:meth:`LandmarkIndex.set_penalty`), and the control without it is reported as
``no_penalty/<metric>``.
"""

from __future__ import annotations

import numpy as np

from core.labels import NONLANDMARK
from recognition.artifact import LandmarkIndex, PenaltyParams
from recognition.calibration import CalibrationError, calibrate_threshold, check_calibration_rule
from recognition.centroids import CentroidParams, Representation
from retrieval.decision import decide, select
from retrieval.metrics import (
    DEFAULT_ALPHAS,
    FprMetrics,
    fpr_metric_names,
    gap,
    precision_at_1,
    score_decisions,
)

__all__ = ["SHIPPED_TOP_K", "evaluate_centroid_index"]

#: Candidates per photo, :class:`recognition.Recognizer`'s default. Without a GPS filter only the
#: first one decides, so this changes no figure; it keeps the path the one that ships.
SHIPPED_TOP_K = 5


def evaluate_centroid_index(
    gallery_emb: np.ndarray,
    gallery_labels,
    query_emb: np.ndarray,
    query_labels,
    distractor_emb: np.ndarray | None = None,
    alphas=DEFAULT_ALPHAS,
    user_prior: float | None = 0.01,
    calibration_emb: np.ndarray | None = None,
    representation: Representation = "centroids",
    params: CentroidParams = CentroidParams(),
    index_kind: str = "flat",
    index_params: dict | None = None,
    top_k: int = SHIPPED_TOP_K,
    memory_budget_mb: float = 256,
    penalty_pool_emb: np.ndarray | None = None,
    penalty: PenaltyParams = PenaltyParams(),
    calibration_rule: str = "empirical",
) -> dict[str, float]:
    """Recognition figures of the shipped decision path (see the module docstring).

    Args:
        gallery_emb, gallery_labels: the landmark database, ``[n_g, d]`` unit rows and int labels.
        query_emb, query_labels: queries; ``NONLANDMARK`` rows count as distractors.
        distractor_emb: optional ``[n_d, d]`` non-landmark photos.
        alphas, user_prior: as in :func:`retrieval.metrics.evaluate_recognition`.
        calibration_emb: optional ``[n_c, d]`` non-landmark photos to calibrate the threshold on,
            as ``landmarks index --nonlandmarks`` does; the distractors then measure the FPR the
            threshold achieves on photos it was not calibrated on (``actual_fpr@fpr=...``).
            Without it the threshold is calibrated on the distractors themselves.
        representation, params, index_kind, index_params: how the index is built (``landmarks
            index`` options; the defaults are the command's).
        top_k: candidates per photo (:data:`SHIPPED_TOP_K`).
        memory_budget_mb: forwarded to the searches.
        penalty_pool_emb: optional ``[n_p, d]`` known non-landmark photos (the training pool): the
            index gets the non-landmark penalty of ``landmarks index --nonlandmark-pool`` with
            ``penalty``'s weight and k, and is calibrated and decided on penalised scores. The
            same index without it is scored too, as the control, under ``no_penalty/<metric>``.
        calibration_rule: ``landmarks index --calibration-rule`` (:mod:`recognition.calibration`).

    Returns:
        ``{metric name: value}``, names as in the module docstring.
    """
    gl = np.asarray(gallery_labels, dtype=np.int64)
    ql = np.asarray(query_labels, dtype=np.int64)
    if len(gl) != len(gallery_emb) or len(ql) != len(query_emb):
        raise ValueError(f"embeddings and labels differ in length: gallery {len(gallery_emb)} vs {len(gl)}, "
                         f"queries {len(query_emb)} vs {len(ql)}")
    landmark_rows = gl != NONLANDMARK
    if not landmark_rows.any():
        raise ValueError("the gallery has no landmark images to build a centroid index from")
    index = LandmarkIndex.from_embeddings(
        np.asarray(gallery_emb)[landmark_rows], [str(x) for x in gl[landmark_rows]], representation=representation,
        params=params, index_kind=index_kind, index_params=index_params,
    )
    d = np.asarray(query_emb).shape[1]
    distractors = np.zeros((0, d), np.float32) if distractor_emb is None else np.asarray(distractor_emb)
    photos = np.concatenate([np.asarray(query_emb, dtype=np.float32), distractors.astype(np.float32, copy=False)])
    true = np.concatenate([ql, np.full(len(distractors), NONLANDMARK, np.int64)])
    calibration = None if calibration_emb is None else np.asarray(calibration_emb, dtype=np.float32)
    score = dict(photos=photos, true=true, n_queries=len(ql), calibration_emb=calibration, alphas=alphas,
                 user_prior=user_prior, top_k=top_k, memory_budget_mb=memory_budget_mb,
                 calibration_rule=check_calibration_rule(calibration_rule))
    if penalty_pool_emb is None:
        metrics = _score_index(index, **score)
    else:
        # The control first (the same index without the penalty), then the decision that ships.
        control = _score_index(index, **score)
        index.set_penalty(np.asarray(penalty_pool_emb, dtype=np.float32), penalty.weight, penalty.k)
        metrics = _score_index(index, **score)
        metrics.update({f"no_penalty/{name}": value for name, value in control.items()
                        if not name.startswith(("n_", "dropped_"))})
    return metrics


def _score_index(index: LandmarkIndex, photos: np.ndarray, true: np.ndarray, n_queries: int,
                 calibration_emb: np.ndarray | None, alphas, user_prior: float | None, top_k: int,
                 memory_budget_mb: float, calibration_rule: str) -> dict[str, float]:
    """Steps 2–4 of the module docstring: calibrate on the index's own scores, decide, count."""
    index_labels = np.array(index.landmark_ids, dtype=np.int64)
    # What Recognizer.decide sees for each photo: top-k landmark rows and their scores.
    scores, rows = index.search(photos, top_k, memory_budget_mb=memory_budget_mb)
    labels = np.where(rows >= 0, index_labels[np.maximum(rows, 0)], NONLANDMARK)
    allowed = rows >= 0

    # What `landmarks index --nonlandmarks` calibrates on: the non-landmark photos' top-1 scores
    # against the index (LandmarkIndex.top1), i.e. their first candidate's score, already searched.
    if calibration_emb is None:
        calibration_scores = scores[true == NONLANDMARK, 0]
    else:
        calibration_scores = index.search(calibration_emb, 1, memory_budget_mb=memory_budget_mb)[0][:, 0]
    out: dict[float, dict] = {}
    unresolved: list[float] = []
    for alpha in alphas:
        alpha = float(alpha)
        try:
            if alpha >= 1.0:
                raise CalibrationError("landmarks index cannot calibrate for FPR 1")
            threshold = calibrate_threshold(calibration_scores, alpha, rule=calibration_rule).threshold
        except CalibrationError:
            unresolved.append(alpha)
            continue
        decision = decide(scores, labels, threshold, allowed)
        out[alpha] = score_decisions(decision.label, decision.accepted, true, threshold, user_prior)

    metrics = fpr_metric_names(FprMetrics(out, unresolved=tuple(unresolved)), user_prior)
    top = select(scores, labels, allowed)
    metrics["gap"] = gap(top.label, top.score, true)
    metrics["p@1"] = precision_at_1(index_labels, rows[:n_queries, :1], true[:n_queries])
    metrics["n_vectors"] = int(len(index))
    metrics["n_landmarks"] = int(len(index_labels))
    metrics["dropped_images"] = int(index.build["dropped_images"])
    return metrics
