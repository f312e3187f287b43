"""GLDv2 recognition scoring: Global Average Precision over the test set, non-landmarks included.

The Google Landmark Recognition challenge scores one ``(landmark, score)`` prediction per test
image. Most GLDv2 test images show no landmark (an empty ``landmarks`` cell in
``recognition_solution_v2.1.csv``); their predictions stay in the ranking and can only lower the
precision of the correct ones ranked below them: that is why GAP rewards low scores on
non-landmarks. This module adapts the challenge's conventions (multi-label ground truth, ignored
images, tie order) to :func:`retrieval.metrics.gap`, which holds the definition itself:

* ``M`` = number of scored test images with at least one landmark. A landmark image without a
  prediction still counts in ``M`` (a miss).
* A prediction is correct iff its landmark is one of the image's ground-truth landmarks.
* Images whose ``Usage`` is ``Ignored`` are not scored; a prediction for an image that is not in
  the solution at all is an error (as in the official scorer), since it usually means the wrong
  solution file or a mangled id.
* Ties in score are ordered by image id ascending (Kaggle's convention), so the value is
  deterministic and equal to the challenge's.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from core.labels import NONLANDMARK
from retrieval.metrics import gap

__all__ = ["gldv2_gap", "top1_accuracy"]


def _arrays(
    predictions: Mapping[str, tuple[int, float]],
    solution: Mapping[str, Sequence[int]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    unknown = [key for key in predictions if key not in solution]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted test image(s) are not in the solution (e.g. {unknown[0]!r}); "
            "wrong solution file, or ignored images passed as scored ones?"
        )
    ids = sorted(solution)  # id order = Kaggle's tie order (stable sort in gap())
    pred = np.full(len(ids), NONLANDMARK, dtype=np.int64)
    score = np.full(len(ids), -np.inf, dtype=np.float64)
    true = np.full(len(ids), NONLANDMARK, dtype=np.int64)
    for row, key in enumerate(ids):
        labels = [int(x) for x in solution[key]]
        if any(x < 0 for x in labels):
            raise ValueError(f"test image {key!r}: negative landmark id in the solution")
        if key in predictions:
            landmark, value = predictions[key]
            landmark, value = int(landmark), float(value)
            if landmark < 0:
                raise ValueError(f"test image {key!r}: negative predicted landmark id {landmark}")
            if math.isnan(value):
                raise ValueError(f"test image {key!r}: score is NaN")
            pred[row], score[row] = landmark, value
        if labels:
            # Multi-label ground truth → the single label gap() compares with: the prediction
            # itself when it is one of the labels, otherwise any label (the prediction is wrong).
            true[row] = pred[row] if pred[row] in labels else labels[0]
    return pred, score, true


def gldv2_gap(
    predictions: Mapping[str, tuple[int, float]],
    solution: Mapping[str, Sequence[int]],
    ignore_nonlandmark_queries: bool = False,
) -> float:
    """GAP of ``{test id: (landmark id, score)}`` against ``{test id: [landmark ids]}``.

    ``solution`` holds the scored images only (Public, Private or both; Ignored left out), with
    an empty list for non-landmark images. ``ignore_nonlandmark_queries=True`` drops those from
    the ranking (the official scorer's option; *not* the challenge metric). NaN if no scored
    image shows a landmark.
    """
    pred, score, true = _arrays(predictions, solution)
    if ignore_nonlandmark_queries:
        keep = true != NONLANDMARK
        pred, score, true = pred[keep], score[keep], true[keep]
    return gap(pred, score, true)


def top1_accuracy(predictions: Mapping[str, tuple[int, float]], solution: Mapping[str, Sequence[int]]) -> float:
    """Correct predictions over landmark test images (non-landmarks excluded); NaN if there are none."""
    pred, _, true = _arrays(predictions, solution)
    landmark = true != NONLANDMARK
    return float((pred[landmark] == true[landmark]).mean()) if landmark.any() else math.nan
