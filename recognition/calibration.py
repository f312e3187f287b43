"""The acceptance threshold, calibrated on photos that show no landmark.

A recogniser is judged by how often it names a landmark in an ordinary photo. The threshold is
therefore set on a calibration set of non-landmark photos: their top-1 scores against the index
are exactly the scores that must be rejected, and the threshold is the score above which only a
fraction ``target_fpr`` of them lie (:func:`retrieval.decision.threshold_at_fpr`, the same
function the training-time metrics use), for the acceptance rule of :func:`retrieval.decision.decide`
(accept iff ``score >= threshold``). Calibration must use the same index and the same model as
recognition.

Two rules (:data:`CALIBRATION_RULES`) say what "at most ``target_fpr``" promises:

- ``empirical`` (the default of ``landmarks index``): at most that fraction of *these* photos
  pass (:func:`retrieval.decision.threshold_at_fpr`). Exact on the calibration set, which is what
  a protocol that tests on its calibration photos asks for; on photos not yet seen it passes
  ``(k + 1) / (n + 1)`` in expectation, 1.5x the target for 2,000 photos at 1e-3.
- ``conformal``: at most that rate, in expectation, of *new* photos exchangeable with these
  (:func:`retrieval.decision.conformal_threshold`; one calibration photo fewer passes at 2,000
  photos and 1e-3, for less recall). For a target that is a limit on the photos to come
  (``landmarks index`` / ``landmarks demo --calibration-rule conformal``; EXPERIMENTS.md).

A calibration set of ``n`` photos cannot resolve a rate below ``1/n`` (``1/(n + 1)`` under the
conformal rule): with 500 photos, "at most 0.1 % false positives" is indistinguishable from "none
of these 500". Such a request is refused unless explicitly allowed, and then the threshold admits
none of the calibration photos and the record says it is unresolved.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from core.errors import UserError
from retrieval.decision import accepts, conformal_threshold, threshold_admitting, threshold_at_fpr

log = logging.getLogger(__name__)

__all__ = ["CALIBRATION_RULES", "Calibration", "CalibrationError", "calibrate_threshold", "check_calibration_rule"]

#: How a target FPR is read (module docstring): on the calibration photos, or on new photos in expectation.
CALIBRATION_RULES = ("empirical", "conformal")


def check_calibration_rule(rule: str) -> str:
    if rule not in CALIBRATION_RULES:
        raise UserError(f"calibration rule must be one of {', '.join(CALIBRATION_RULES)}, got {rule!r}")
    return rule


class CalibrationError(UserError):
    """The calibration set cannot support the requested false-positive rate."""


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold and what it was calibrated for.

    Attributes:
        threshold: accept iff top-1 score >= threshold.
        target_fpr: the false-positive rate asked for (None for a fixed, uncalibrated threshold).
        achieved_fpr: fraction of calibration photos whose top-1 score reaches the threshold
            (None when there was no calibration set).
        n_calibration: calibration photos (readable ones).
        n_false_positives: calibration photos at or above the threshold.
        resolved: False when the calibration set is too small for ``target_fpr`` under ``rule``
            (see the module docstring).
        rule: ``empirical`` or ``conformal`` (:data:`CALIBRATION_RULES`); records made before the
            rule existed read as ``empirical``, the only rule then.
    """

    threshold: float
    target_fpr: float | None
    achieved_fpr: float | None
    n_calibration: int
    n_false_positives: int
    resolved: bool = True
    rule: str = "empirical"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def fixed(cls, threshold: float) -> "Calibration":
        """A threshold chosen by hand: no calibration set, no known false-positive rate."""
        return cls(float(threshold), None, None, 0, 0, resolved=False)

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        def opt(key):
            return None if data[key] is None else float(data[key])

        return cls(
            threshold=float(data["threshold"]), target_fpr=opt("target_fpr"),
            achieved_fpr=opt("achieved_fpr"), n_calibration=int(data["n_calibration"]),
            n_false_positives=int(data["n_false_positives"]), resolved=bool(data["resolved"]),
            rule=str(data.get("rule", "empirical")),
        )


def calibrate_threshold(scores, target_fpr: float = 1e-3, allow_unresolved: bool = False,
                        rule: str = "empirical") -> Calibration:
    """Threshold at which at most ``target_fpr`` of the non-landmark ``scores`` are accepted.

    Args:
        scores: top-1 scores of the calibration (non-landmark) photos against the index.
        target_fpr: in (0, 1).
        rule: ``empirical`` (at most ``target_fpr`` of these photos) or ``conformal`` (at most
            ``target_fpr`` of new photos, in expectation); see the module docstring.
        allow_unresolved: with fewer than ``1 / target_fpr`` scores, warn and return the threshold
            that admits none of them (``resolved=False``) instead of raising.

    Raises:
        CalibrationError: too few scores for ``target_fpr`` (and not allowed), or no scores.
    """
    target_fpr = float(target_fpr)
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    s = np.asarray(scores, dtype=np.float32).ravel()
    if not np.isfinite(s).all():
        raise ValueError("calibration scores contain NaN or inf")
    n = int(s.size)
    if n == 0:
        raise CalibrationError("no readable calibration images: cannot calibrate a threshold")
    check_calibration_rule(rule)
    if rule == "conformal":
        needed = math.ceil(1.0 / target_fpr - 1 - 1e-9)
        threshold = conformal_threshold(s, target_fpr)
    else:
        needed = math.ceil(1.0 / target_fpr - 1e-9)
        threshold = threshold_at_fpr(s, target_fpr)
    resolved = threshold is not None
    if not resolved:
        message = (
            f"{n} calibration images cannot resolve a false-positive rate of {target_fpr:g}: that needs at "
            f"least {needed} non-landmark images ({'1/FPR - 1, conformal rule' if rule == 'conformal' else '1/FPR'})"
        )
        if not allow_unresolved:
            raise CalibrationError(message + "; add calibration images, raise the target FPR, or allow an "
                                   "unresolved calibration explicitly")
        threshold = threshold_admitting(s, 0)
        log.warning("!" * 72)
        log.warning("%s. Using the threshold that admits none of them (%.6f); the real false-positive "
                    "rate is unknown.", message, threshold)
        log.warning("!" * 72)
    n_fp = int(accepts(s, threshold).sum())
    return Calibration(threshold, target_fpr, n_fp / n, n, n_fp, resolved, rule)
