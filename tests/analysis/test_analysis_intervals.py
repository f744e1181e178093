"""The statistics behind every reported ICL figure: t quantiles, binomial errors, their
combination, the unpaired difference, ratios and the cross-fitted peak, on known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.intervals import Z95, binomial_se, combine, cross_fit_peak, ratio_interval, t95, welch


def test_t_quantiles_match_the_tables():
    assert t95(1) == pytest.approx(12.706, abs=1e-3) and t95(2) == pytest.approx(4.303, abs=1e-3)
    assert t95(9) == pytest.approx(2.262, abs=1e-3) and t95(120) == pytest.approx(1.980, abs=1e-3)
    assert t95(1e6) == pytest.approx(Z95, abs=1e-5) and math.isnan(t95(0))
    assert t95(4) > t95(4.5) > t95(5)  # fractional degrees of freedom (Welch) between their neighbours


def test_t_quantiles_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [1, 2, 3, 7, 30, 31, 45.5, 200]:
        assert t95(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-5)
    for df in np.linspace(4, 30, 53):  # interpolated: never narrower, at most 1% wider
        assert 1 - 1e-6 <= t95(df) / stats.t.ppf(0.975, df) < 1.01


def test_binomial_error_of_an_accuracy():
    assert binomial_se(0.5, 1024) == pytest.approx(math.sqrt(0.25 / 1024), rel=1e-3)
    assert 0 < binomial_se(1.0, 1024) < 0.005  # a perfect score still has an error (Agresti-Coull)
    assert math.isnan(binomial_se(0.5, math.nan))


def test_seed_spread_and_evaluation_error_in_quadrature():
    values, se = [0.80, 0.84, 0.88], [0.01, 0.01, 0.01]
    ci = combine(values, se, bounds=(0, 1))
    half = math.hypot(t95(2) * 0.04 / math.sqrt(3), Z95 * 0.01)
    assert (ci.mean, ci.lo, ci.hi, ci.n) == pytest.approx((0.84, 0.84 - half, 0.84 + half, 3))
    assert ci.how == "t over 3 seeds + binomial error of the evaluation set"
    one = combine([0.7], [0.02])
    assert (one.lo, one.hi) == pytest.approx((0.7 - Z95 * 0.02, 0.7 + Z95 * 0.02)) and "only (1 seed)" in one.how
    bare = combine([0.7])
    assert math.isnan(bare.lo) and bare.how.startswith("none")
    clipped = combine([0.99, 1.0], [0.01, 0.01], bounds=(0, 1))
    assert clipped.hi == 1.0 and clipped.half > clipped.hi - clipped.mean  # the half-width before clipping kept


def test_unpaired_difference_is_welch():
    ci = welch(0.9, 0.02, 3, 0.6, 0.04, 5)
    va, vb = 0.02**2 / 3, 0.04**2 / 5
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 4)
    assert ci.mean == pytest.approx(0.3) and ci.half == pytest.approx(t95(df) * math.sqrt(va + vb))
    assert "Welch t over 3 and 5 unpaired seeds" == ci.how
    assert math.isnan(welch(0.9, math.nan, 1, 0.6, math.nan, 1).lo)  # one seed each, no set size: nothing


def test_ratio_interval_by_the_delta_method():
    num, den = combine([0.80, 0.84, 0.88]), combine([0.90, 0.92, 0.94])
    r, lo, hi = ratio_interval(num, den)
    half = r * math.hypot(num.half / 0.84, den.half / 0.92)
    assert (r, lo, hi) == pytest.approx((0.84 / 0.92, r - half, r + half))
    assert math.isnan(ratio_interval(num, combine([0.9]))[1])  # no interval on one side: none on the ratio


def test_cross_fit_reads_each_half_where_the_other_peaks():
    even = [0.5, 0.7, 0.9, 0.9, 0.8]  # first maximum at index 2
    odd = [0.5, 0.8, 0.7, 0.6, 0.85]  # maximum at index 4
    assert cross_fit_peak(even, odd) == ((0.7 + 0.8) / 2, 2, 4)
