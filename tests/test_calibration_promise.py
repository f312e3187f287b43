"""What a calibrated threshold promises about new photos (recognition.calibration): the rate at
which new non-landmark photos pass is Beta(k + 1, n - k) distributed over the draw of the n
calibration photos, whatever the scores. Checked by hand on small cases, against the simulated
draw of calibration sets through the real calibration, and the planner against brute force."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from recognition.calibration import (
    Calibration,
    calibrate_threshold,
    calibration_photos_needed,
    new_photo_fpr,
    new_photo_fpr_above,
)
from retrieval.decision import admitted_conformal, admitted_empirical


def test_hand_computed_cases():
    # n = 1, k = 0: the rate is uniform on [0, 1] (Beta(1, 1)).
    assert new_photo_fpr(1, 0, 0.95) == pytest.approx((0.5, 0.95))
    # n = 3, k = 0: Beta(1, 3), P(rate > x) = (1 - x)^3; the 95 % bound solves (1 - x)^3 = 0.05.
    assert new_photo_fpr(3, 0, 0.95) == pytest.approx((0.25, 1 - 0.05 ** (1 / 3)))
    assert new_photo_fpr_above(3, 0, 0.2) == pytest.approx(0.8 ** 3)
    # n = 4, k = 1: P(Binomial(4, x) <= 1) = (1 - x)^4 + 4 x (1 - x)^3.
    assert new_photo_fpr_above(4, 1, 0.3) == pytest.approx(0.7 ** 4 + 4 * 0.3 * 0.7 ** 3)
    # The demo's calibration (2,000 photos, 2 admitted at 1e-3): P(Poisson(4) <= 2) to 3 digits.
    assert new_photo_fpr_above(2000, 2, 2e-3) == pytest.approx(math.exp(-4) * (1 + 4 + 8), abs=2e-3)
    assert new_photo_fpr_above(10, 3, 1.0) == 0.0  # nothing exceeds every photo (scipy: NaN)
    with pytest.raises(ValueError, match="admitted"):
        new_photo_fpr(10, 10)
    with pytest.raises(ValueError, match="factor"):
        calibration_photos_needed(1e-3, factor=1.01)


@pytest.mark.parametrize("rule", ["empirical", "conformal"])
def test_the_counts_the_planner_assumes_are_those_calibration_admits(rule):
    """calibration_photos_needed reasons with admitted_*; the real calibration must admit as many."""
    admitted = admitted_conformal if rule == "conformal" else admitted_empirical
    rng = np.random.default_rng(1)
    for n in range(77, 400, 7):
        cal = calibrate_threshold(rng.random(n), 0.013, rule=rule, allow_unresolved=True)
        assert cal.n_false_positives == max(admitted(n, 0.013), 0), n


@pytest.mark.parametrize("rule, admitted", [("empirical", 2), ("conformal", 1)])
def test_the_promise_matches_simulated_calibration_draws(rule, admitted):
    """4,000 calibration sets of 200 uniform scores at FPR 0.01, calibrated by the real code.
    For uniform scores a threshold t lets through exactly 1 - t of new photos."""
    rng = np.random.default_rng(0)
    cals = [calibrate_threshold(rng.random(200), 0.01, rule=rule) for _ in range(4000)]
    assert {c.n_false_positives for c in cals} == {admitted}
    rates = np.array([1.0 - c.threshold for c in cals])
    expected, bound = cals[0].new_photo_fpr(0.95)
    assert expected == (admitted + 1) / 201
    se = rates.std() / math.sqrt(len(rates))
    assert abs(rates.mean() - expected) < 4 * se
    # How often the bound and twice the target are exceeded; 4 binomial standard errors.
    assert abs(np.mean(rates > bound) - 0.05) < 4 * math.sqrt(0.05 * 0.95 / 4000)
    p2 = cals[0].chance_above(0.02)
    assert abs(np.mean(rates > 0.02) - p2) < 4 * math.sqrt(p2 * (1 - p2) / 4000)


@pytest.mark.parametrize("rule", ["empirical", "conformal"])
@pytest.mark.parametrize("target, factor, chance", [(0.01, 2.0, 0.1), (0.02, 3.0, 0.05), (0.013, 1.5, 0.2)])
def test_calibration_photos_needed_matches_brute_force(rule, target, factor, chance):
    admitted = admitted_conformal if rule == "conformal" else admitted_empirical
    smallest = 0 if rule == "conformal" else 1  # fewer admitted: the rule refuses the set

    sizes = np.arange(1, 5000)
    k = np.array([admitted(int(n), target) for n in sizes])
    # P(Binomial(n, x) <= k) by scipy directly, every size at once (no bisection, no shortcut)
    fails = (k < smallest) | (binom.cdf(k, sizes, factor * target) > chance)
    failing = sizes[fails]
    assert len(failing) and failing[-1] < 4000  # the scan reaches well past the last failure
    assert calibration_photos_needed(target, rule, factor, chance) == failing[-1] + 1


def test_the_printed_promise():
    cal = Calibration(0.7, 1e-3, 1e-3, 2000, 2, True, "empirical")
    assert cal.new_photo_lines() == [
        "FPR on new photos: 0.0015 expected, under 0.0031 in 95 % of calibration draws",
        "over 0.002 (2 × the target) in 24 % of draws; 3,339 calibration photos: at most 10 %",
    ]
    # Enough photos: no advice. A fixed threshold: no promise.
    assert len(Calibration(0.7, 1e-3, 1e-3, 5000, 5, True, "empirical").new_photo_lines()) == 1
    assert Calibration.fixed(0.5).new_photo_lines() == [] and Calibration.fixed(0.5).new_photo_fpr() is None
