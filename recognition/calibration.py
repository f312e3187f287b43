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

**What a calibration promises about new photos.** A threshold that admits ``k`` of ``n``
calibration photos lets through a fraction of *new* non-landmark photos that depends on the draw
of the calibration set: for photos exchangeable with these (the same kind of photo) and continuous
scores, that fraction is Beta(k + 1, n - k) distributed, whatever the model (the threshold sits at
the (k + 1)-th highest of n uniform ranks). Its mean is ``(k + 1) / (n + 1)``; the chance that it
exceeds a rate ``x`` is ``P(Binomial(n, x) <= k)``. With 2,000 photos at 1e-3 (``k = 2``) the
fraction exceeds 2e-3 for about one calibration set in four (0.24). No model changes that for a
given ``k``; a rule that admits fewer photos lowers it for less recall (conformal, ``k = 1``:
0.09), and more photos lower it at the same target. :meth:`Calibration.new_photo_fpr` and
:meth:`Calibration.chance_above` report it for a calibrated index; :func:`calibration_photos_needed`
says how many photos keep it under a bound (EXPERIMENTS.md compares it with redrawn calibration
sets). Tied scores make a threshold admit fewer photos than the rule's ``k``: the figures, from the
photos actually admitted, are then conservative, and the advice may name a size already reached.

A calibration set of ``n`` photos cannot resolve a rate below ``1/n`` (``1/(n + 1)`` under the
conformal rule): with 500 photos, "at most 0.1 % false positives" is indistinguishable from "none
of these 500". Such a request is refused unless explicitly allowed, and then the threshold admits
none of the calibration photos and the record says it is unresolved.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np

from core.errors import UserError
from retrieval.decision import (
    accepts,
    admitted_conformal,
    admitted_empirical,
    conformal_threshold,
    threshold_admitting,
    threshold_at_fpr,
)

log = logging.getLogger(__name__)

__all__ = ["CALIBRATION_RULES", "HARDEST_CALIBRATION_PHOTOS", "Calibration", "CalibrationError", "calibrate_threshold",
           "calibration_photos_needed", "check_calibration_rule", "hardest_calibration_photos", "new_photo_fpr",
           "new_photo_fpr_above"]

#: How a target FPR is read (module docstring): on the calibration photos, or on new photos in expectation.
CALIBRATION_RULES = ("empirical", "conformal")


#: Each rule's count of admitted calibration photos (retrieval.decision), and the fewest it must
#: admit to resolve the target (fewer: threshold_at_fpr / conformal_threshold return None).
_ADMITTED = {"empirical": (admitted_empirical, 1), "conformal": (admitted_conformal, 0)}


def _smallest_set(k: int, target_fpr: float, rule: str) -> int:
    """The fewest calibration photos from which ``rule`` admits ``k`` of them at ``target_fpr``."""
    admitted, _ = _ADMITTED[rule]
    n = max(k + 1, int((k + 1 if rule == "conformal" else k) / target_fpr) - 3)  # a few below the exact bound
    while admitted(n, target_fpr) < k:
        n += 1
    return n


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

    def new_photo_fpr(self, confidence: float = 0.95) -> tuple[float, float] | None:
        """The false-positive rate on new photos: expected, and the bound it stays under with
        probability ``confidence`` (:func:`new_photo_fpr`); None without a calibration set."""
        if not self.n_calibration:
            return None
        return new_photo_fpr(self.n_calibration, self.n_false_positives, confidence)

    def chance_above(self, fpr: float) -> float | None:
        """Probability that new photos pass at more than ``fpr`` (:func:`new_photo_fpr_above`)."""
        if not self.n_calibration:
            return None
        return new_photo_fpr_above(self.n_calibration, self.n_false_positives, fpr)

    def new_photo_lines(self, factor: float = 2.0, chance: float = 0.1) -> list[str]:
        """What the threshold promises about new photos, as ``landmarks index`` and ``landmarks
        demo`` print it; when more than ``factor`` × the target happens more often than ``chance``,
        also how many calibration photos would make it rarer. Empty without a calibration set."""
        if self.target_fpr is None or not 0 <= self.n_false_positives < self.n_calibration:
            return []
        expected, bound = self.new_photo_fpr()
        lines = [f"FPR on new photos: {expected:.2g} expected, under {bound:.2g} in 95 % of calibration draws"]
        limit = factor * self.target_fpr
        above = self.chance_above(limit)  # 0 for a limit of 1 or more
        if above > chance:
            needed = calibration_photos_needed(self.target_fpr, self.rule, factor, chance)
            lines.append(f"over {limit:.2g} ({factor:g} × the target) in {above * 100:.0f} % of draws; "
                         f"{needed:,} calibration photos: at most {chance * 100:g} %")
        return lines

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
        scores: top-1 scores of the calibration (non-landmark) photos against the index; ``-inf``
            for a photo with no candidate at all (e.g. none within a GPS radius), never accepted
            but counted.
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
    # -inf is a photo with no candidate at all (e.g. none within a GPS radius): never accepted.
    if np.isnan(s).any() or np.isposinf(s).any():
        raise ValueError("calibration scores contain NaN or +inf")
    n = int(s.size)
    if n == 0:
        raise CalibrationError("no readable calibration images: cannot calibrate a threshold")
    check_calibration_rule(rule)
    threshold = (conformal_threshold if rule == "conformal" else threshold_at_fpr)(s, target_fpr)
    resolved = threshold is not None
    if not resolved:
        message = (
            f"{n} calibration images cannot resolve a false-positive rate of {target_fpr:g}: that needs at "
            f"least {_smallest_set(_ADMITTED[rule][1], target_fpr, rule)} non-landmark images ({'1/FPR - 1, conformal rule' if rule == 'conformal' else '1/FPR'})"
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


#: How many of the highest-scoring calibration photos an index records (``index.json``, ``build``).
HARDEST_CALIBRATION_PHOTOS = 8


def hardest_calibration_photos(scores, landmark_rows, paths, landmark_ids, threshold: float,
                               count: int = HARDEST_CALIBRATION_PHOTOS) -> list[dict]:
    """The calibration photos with the highest top-1 scores, highest first: the few that decide a
    threshold at a low FPR (at 1e-3 of 3,500 photos, the 4th highest sets it), as the evaluation
    lists its hardest distractors (:func:`retrieval.metrics.hardest_distractors`, the same order
    and tie rule). ``count`` of them, or more where ``threshold`` accepts ``count`` or more: then
    every accepted photo and the first one rejected. Each entry: ``rank`` (from 1), ``score``,
    ``photo`` (its absolute path, symlinks resolved), the ``landmark_id`` it matched
    (``landmark_rows`` index ``landmark_ids``; -1: none) and whether ``threshold`` ``accepted`` it."""
    # Imported here, not above: retrieval.metrics loads FAISS, which the CLI's argument parser need not.
    from retrieval.metrics import hardest_distractors

    s = np.asarray(scores, dtype=np.float32).ravel()
    rows = np.asarray(landmark_rows).ravel()
    if not len(s) == len(rows) == len(paths):
        raise ValueError(f"{len(s)} scores, {len(rows)} landmark rows and {len(paths)} paths: one of each per photo")
    accepted = accepts(s, threshold)
    return [
        {"rank": rank, "score": float(s[i]), "photo": os.path.realpath(paths[i]),
         "landmark_id": None if rows[i] < 0 else str(landmark_ids[rows[i]]), "accepted": bool(accepted[i])}
        for rank, i in enumerate(hardest_distractors(s, max(count, int(accepted.sum()) + 1)), 1)
    ]


def _check_counts(n_calibration: int, n_admitted: int) -> None:
    if not 0 <= n_admitted < n_calibration:
        raise ValueError(f"need 0 <= admitted < calibration photos, got {n_admitted} of {n_calibration}")


def new_photo_fpr(n_calibration: int, n_admitted: int, confidence: float = 0.95) -> tuple[float, float]:
    """``(expected, bound)``: the false-positive rate on new photos of a threshold that admits
    ``n_admitted`` of ``n_calibration`` calibration photos, in expectation over the draw of the
    calibration set, ``(k + 1) / (n + 1)``, and the value it stays under with probability
    ``confidence``, the quantile of Beta(k + 1, n - k) (module docstring)."""
    from scipy.stats import beta

    _check_counts(n_calibration, n_admitted)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k, n = n_admitted, n_calibration
    return (k + 1) / (n + 1), float(beta.ppf(confidence, k + 1, n - k))


def new_photo_fpr_above(n_calibration: int, n_admitted: int, fpr: float) -> float:
    """Probability, over the draw of the calibration set, that a threshold admitting ``n_admitted``
    of ``n_calibration`` photos lets more than ``fpr`` of new photos through:
    ``P(Beta(k + 1, n - k) > fpr) = P(Binomial(n, fpr) <= k)``."""
    from scipy.stats import binom

    _check_counts(n_calibration, n_admitted)
    if fpr >= 1.0:
        return 0.0  # no share exceeds everything (scipy would say NaN)
    return float(binom.cdf(n_admitted, n_calibration, fpr))


def calibration_photos_needed(target_fpr: float, rule: str = "empirical", factor: float = 2.0,
                              chance: float = 0.1) -> int:
    """The fewest calibration photos from which on (for that many and for every larger set) the
    threshold of ``rule`` at ``target_fpr`` lets more than ``factor * target_fpr`` of new photos
    through with probability at most ``chance``: 3,339 for the empirical rule at 1e-3 (2x, 10 %).

    Within a run of set sizes that admit the same ``k`` photos the probability falls as the set
    grows, and it jumps up where ``k`` steps, so each run is checked at its start and bisected."""
    check_calibration_rule(rule)
    # A factor near 1 needs ever larger sets (the bound then sits at the rate's own mean): refused.
    if not 0.0 < target_fpr < 1.0 or factor < 1.1 or not 0.0 < chance < 1.0 or factor * target_fpr >= 1.0:
        raise ValueError(f"need 0 < target_fpr, 1.1 <= factor, factor * target_fpr < 1 and 0 < chance < 1, got "
                         f"target_fpr={target_fpr}, factor={factor}, chance={chance}")
    admitted, smallest_k = _ADMITTED[rule]  # below smallest_k the rule refuses (unresolved)

    def fails(n: int) -> bool:
        return new_photo_fpr_above(n, admitted(n, target_fpr), factor * target_fpr) > chance

    start = _smallest_set(smallest_k, target_fpr, rule)
    last_failing, passing_runs, k = start - 1, 0, smallest_k
    while passing_runs < 20:  # the probability at a run's start falls with k; 20 clean runs end it
        lo, start = start, _smallest_set(k + 1, target_fpr, rule)
        hi = start - 1
        if fails(lo):
            passing_runs = 0
            while lo < hi:  # the last failing size in [lo, hi]
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fails(mid) else (lo, mid - 1)
            last_failing = lo
        else:
            passing_runs += 1
        k += 1
    return last_failing + 1
