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
clusters dropped as too small).
"""

from __future__ import annotations

import numpy as np

from core.labels import NONLANDMARK
from recognition.artifact import LandmarkIndex
from recognition.calibration import CalibrationError, calibrate_threshold
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
    index_labels = np.array(index.landmark_ids, dtype=np.int64)

    d = np.asarray(query_emb).shape[1]
    distractors = np.zeros((0, d), np.float32) if distractor_emb is None else np.asarray(distractor_emb)
    photos = np.concatenate([np.asarray(query_emb, dtype=np.float32), distractors.astype(np.float32, copy=False)])
    true = np.concatenate([ql, np.full(len(distractors), NONLANDMARK, np.int64)])

    # What Recognizer.decide sees for each photo: top-k landmark rows and their scores.
    scores, rows = index.search(photos, top_k, memory_budget_mb=memory_budget_mb)
    labels = np.where(rows >= 0, index_labels[np.maximum(rows, 0)], NONLANDMARK)
    allowed = rows >= 0

    # What `landmarks index --nonlandmarks` calibrates on: the non-landmark photos' top-1 scores
    # against the index (LandmarkIndex.top1), i.e. their first candidate's score, already searched.
    if calibration_emb is None:
        calibration_scores = scores[true == NONLANDMARK, 0]
    else:
        calibration_scores = index.search(np.asarray(calibration_emb, dtype=np.float32), 1,
                                          memory_budget_mb=memory_budget_mb)[0][:, 0]
    out: dict[float, dict] = {}
    unresolved: list[float] = []
    for alpha in alphas:
        alpha = float(alpha)
        try:
            if alpha >= 1.0:
                raise CalibrationError("landmarks index cannot calibrate for FPR 1")
            threshold = calibrate_threshold(calibration_scores, alpha).threshold
        except CalibrationError:
            unresolved.append(alpha)
            continue
        decision = decide(scores, labels, threshold, allowed)
        out[alpha] = score_decisions(decision.label, decision.accepted, true, threshold, user_prior)

    metrics = fpr_metric_names(FprMetrics(out, unresolved=tuple(unresolved)), user_prior)
    top = select(scores, labels, allowed)
    metrics["gap"] = gap(top.label, top.score, true)
    metrics["p@1"] = precision_at_1(index_labels, rows[: len(ql), :1], ql)
    metrics["n_vectors"] = int(len(index))
    metrics["n_landmarks"] = int(len(index_labels))
    metrics["dropped_images"] = int(index.build["dropped_images"])
    return metrics
