"""Statistics over seeds: the t distribution against closed forms, a numerical integral and printed tables;
intervals and paired differences against hand computations."""

import math

import numpy as np
import pytest

from aoi_jax import stats


def t_central_by_integration(t, df, n=200_001):
    """P(|X| <= t) as 2 * integral_0^t of the t density, trapezoid rule on n points (float64)."""
    x = np.linspace(0.0, t, n)
    const = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = const * (1 + x ** 2 / df) ** (-(df + 1) / 2)
    return 2 * float(np.sum((f[1:] + f[:-1]) / 2 * np.diff(x)))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 6, 9, 30])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0])
def test_t_central_matches_the_integrated_density(df, t):
    np.testing.assert_allclose(stats.t_central(t, df), t_central_by_integration(t, df), rtol=0, atol=1e-9)


def test_t_quantile_closed_forms_and_table():
    # df = 1 (Cauchy): q-quantile tan(pi (q - 1/2)); df = 2: (2q - 1) / sqrt(2 q (1 - q)).
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert stats.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
    assert stats.t_quantile(0.9, 2) == pytest.approx(0.8 / math.sqrt(2 * 0.9 * 0.1), rel=1e-12)
    # Two-sided 95 % values as R's qt(0.975, df) prints them (six decimals).
    for df, want in [(3, 3.182446), (4, 2.776445), (9, 2.262157), (19, 2.093024), (100, 1.983972)]:
        assert stats.t_quantile(0.975, df) == pytest.approx(want, abs=5e-7)
    assert stats.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-15)      # the median


def test_mean_interval_by_hand():
    # x = 1..5: mean 3, s = sqrt(2.5), h = t(0.975, 4) * sqrt(2.5) / sqrt(5) = 2.776445 * 0.7071068
    r = stats.mean_interval([1, 2, 3, 4, 5])
    assert r["n"] == 5 and r["mean"] == 3.0 and r["std"] == pytest.approx(math.sqrt(2.5), rel=1e-15)
    assert r["half_width"] == pytest.approx(1.963243, abs=1e-6)
    assert (r["low"], r["high"]) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-6)
    # two values 0.2, 0.6: mean 0.4, s = sqrt(0.08), h = 12.706205 * sqrt(0.08) / sqrt(2) = 12.706205 * 0.2
    r = stats.mean_interval([0.2, 0.6])
    assert r["half_width"] == pytest.approx(2.541241, abs=1e-6)
    r90 = stats.mean_interval([1, 2, 3, 4, 5], level=0.9)                 # t(0.95, 4) = 2.131847
    assert r90["half_width"] == pytest.approx(2.131847 * math.sqrt(0.5), abs=1e-6)


def test_paired_differences_by_hand():
    keys, d = stats.paired_differences({2: 3.5, 0: 2.0, 1: 4.0}, {0: 2.5, 1: 3.0, 2: 3.5})
    assert keys == [0, 1, 2]
    np.testing.assert_array_equal(d, [-0.5, 1.0, 0.0])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        stats.mean_interval([1.0])
    with pytest.raises(ValueError, match="must be finite"):
        stats.mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 95"):
        stats.mean_interval([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match=r"quantile q must be in \[0.5, 1\), got 0.025"):
        stats.t_quantile(0.025, 3)
    with pytest.raises(ValueError, match="integer >= 1, got 2.5"):
        stats.t_quantile(0.975, 2.5)
    with pytest.raises(ValueError, match=r"only treated: \[3\], only baseline: \[\]"):
        stats.paired_differences({0: 1.0, 3: 2.0}, {0: 1.0})


# 3 seeds x 4 alphas; the members of a seed share a large offset (0, 1, 5 on top of 0, 2, 1, 1).
CLUSTERED = [[0, 2, 1, 1], [1, 3, 2, 2], [5, 7, 6, 6]]


def test_cluster_mean_interval_is_wider_than_pooling_correlated_members():
    values = [v for row in CLUSTERED for v in row]
    seeds = [s for s, row in enumerate(CLUSTERED) for _ in row]
    # Pooled as 12 independent members: mean 3; squared deviations 9+1+4+4 + 4+0+1+1 + 4+16+9+9 = 62,
    # s^2 = 62 / 11, h = t(0.975, 11) * sqrt(62 / 11 / 12) = 2.200985 * 0.685345 = 1.508433 (df 11).
    pooled = stats.mean_interval(values)
    assert pooled["half_width"] == pytest.approx(1.508433, abs=1e-6)
    # Seed level: seed means 1, 2, 6, mean 3, s^2 = (4 + 1 + 9) / 2 = 7,
    # h = t(0.975, 2) * sqrt(7 / 3) = 4.302653 * 1.527525 = 6.572411 (df 2): 4.36x the pooled half width.
    r = stats.cluster_mean_interval(values, seeds)
    assert r["df"] == 2 and r["n"] == 3 and r["members"] == 12 and r["clusters"] == [0, 1, 2]
    assert r["mean"] == 3.0 and r["std"] == pytest.approx(np.sqrt(7.0), rel=1e-12)
    assert r["half_width"] == pytest.approx(6.572411, abs=1e-6)
    assert (r["low"], r["high"]) == pytest.approx((3 - 6.572411, 3 + 6.572411), abs=1e-6)
    # the order of the members does not matter; labels may be any hashable
    shuffled = stats.cluster_mean_interval(values[::-1], [f"s{s}" for s in seeds[::-1]])
    assert shuffled["half_width"] == pytest.approx(r["half_width"], rel=1e-12)
    # unequal clusters: the mean of the cluster means (1 and 4), not the grand mean 2.5 of (1, 1, 1, 7)
    assert stats.cluster_mean_interval([1, 1, 1, 4], [0, 0, 0, 1])["mean"] == 2.5
    assert stats.cluster_mean_interval([1, 1, 1, 7], [0, 0, 0, 1])["mean"] == 4.0
    with pytest.raises(ValueError, match="at least 2 clusters"):
        stats.cluster_mean_interval([1.0, 2.0], [0, 0])
    with pytest.raises(ValueError, match="3 values and 2 labels"):
        stats.cluster_mean_interval([1.0, 2.0, 3.0], [0, 1])


def test_excluded_reduction_by_hand():
    # baseline mean 6.23 steps, difference interval [-0.42, +0.42]: reductions above 0.42 / 6.23 = 6.74 %
    assert stats.excluded_reduction(6.23, -0.42) == pytest.approx(0.067416, abs=1e-6)
    # an interval above 0 (low = +0.1, baseline 2): every reduction is excluded, R = -0.05 < 0
    assert stats.excluded_reduction(2.0, 0.1) == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="positive number, got 0"):
        stats.excluded_reduction(0.0, -1.0)
    with pytest.raises(ValueError, match="low must be finite"):
        stats.excluded_reduction(1.0, float("nan"))
