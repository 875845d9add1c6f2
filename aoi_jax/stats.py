"""Small statistics for comparing runs over seeds: Student t intervals and paired differences (numpy only).

A study trains every setting with the same seeds; a setting's effect on a number (e.g. the Top-K mean exit
timestep) is estimated from the per-seed differences against the baseline run of the same seed
(``paired_differences``), summarised as a mean with a Student t interval (``mean_interval``). The t
quantile is computed exactly for integer degrees of freedom from the closed form of the t distribution
(``t_central``), inverted by bisection (``t_quantile``): no table and no scipy.

Members that share a seed are not independent (the alphas of one seed share the initialisation, the batch
order and the calibration key): a difference pooled over a swept key is averaged within each seed first and
the interval taken over the seed means (``cluster_mean_interval``, seeds - 1 degrees of freedom), never over
the members. ``excluded_reduction`` turns the interval of a difference into the largest relative reduction
of the baseline that it leaves possible.
"""

import numpy as np


def t_central(t: float, df: int) -> float:
    """``P(|X| <= t)`` for X Student-t with ``df`` (integer) degrees of freedom, t >= 0.

    Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df), with ``theta = arctan(t / sqrt(df))``::

        df = 1:        2 theta / pi
        df odd >= 3:   (2 / pi) (theta + sin(theta) sum_{k=0}^{(df-3)/2} c_k cos(theta)^(2k+1)),
                       c_0 = 1, c_k = c_{k-1} 2k / (2k + 1)
        df even:       sin(theta) sum_{k=0}^{(df-2)/2} d_k cos(theta)^(2k),
                       d_0 = 1, d_k = d_{k-1} (2k - 1) / (2k)

    Raises:
      ValueError: ``df`` is not an integer >= 1, or ``t`` < 0.
    """
    if int(df) != df or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    df = int(df)
    theta = np.arctan(t / np.sqrt(df))
    c, s = np.cos(theta), np.sin(theta)
    if df % 2:
        total, coef = 0.0, 1.0
        for k in range((df - 1) // 2):                     # k = 0 .. (df - 3) / 2; none for df = 1
            coef = coef * 2 * k / (2 * k + 1) if k else 1.0
            total += coef * c ** (2 * k + 1)
        return float(2 / np.pi * (theta + s * total))
    total, coef = 0.0, 1.0
    for k in range(df // 2):                               # k = 0 .. (df - 2) / 2
        coef = coef * (2 * k - 1) / (2 * k) if k else 1.0
        total += coef * c ** (2 * k)
    return float(s * total)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom, for 0.5 <= q < 1.

    Solves ``t_central(t, df) = 2 q - 1`` by bisection to float64 resolution (the function is increasing
    in t). A two-sided interval of level ``l`` uses ``t_quantile((1 + l) / 2, n - 1)``.

    Raises:
      ValueError: q outside [0.5, 1), or ``df`` not an integer >= 1.
    """
    if not 0.5 <= q < 1.0:
        raise ValueError(f"quantile q must be in [0.5, 1), got {q}")
    target = 2 * q - 1
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < target:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_central(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values, level: float = 0.95) -> dict:
    """Mean of ``values`` (n,) with its two-sided Student t interval over the n samples::

        m = mean(x),  s = std(x, ddof=1),  h = t_quantile((1 + level) / 2, n - 1) * s / sqrt(n)
        interval = [m - h, m + h]

    Returns:
      {"n", "mean", "std", "half_width", "low", "high"} as Python numbers.
    Raises:
      ValueError: fewer than 2 values (no interval), a non-finite value, or ``level`` outside (0, 1).
    """
    x = np.asarray(values, np.float64).ravel()
    if len(x) < 2:
        raise ValueError(f"an interval needs at least 2 values, got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values must be finite, got {x.tolist()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n, m, s = len(x), float(x.mean()), float(x.std(ddof=1))
    h = t_quantile((1 + level) / 2, n - 1) * s / np.sqrt(n)
    return {"n": n, "mean": m, "std": s, "half_width": float(h), "low": m - h, "high": m + h}


def paired_differences(treated: dict, baseline: dict) -> tuple[list, np.ndarray]:
    """Per-pair differences ``treated[k] - baseline[k]`` over the shared pairing keys (e.g. seeds).

    Args:
      treated, baseline: {pairing key: number}; both must hold the same keys.
    Returns:
      (keys sorted, differences (n,) float64 in that order).
    Raises:
      ValueError: the key sets differ (the message names the unpaired keys).
    """
    if set(treated) != set(baseline):
        only_t, only_b = sorted(set(treated) - set(baseline)), sorted(set(baseline) - set(treated))
        raise ValueError(f"paired differences need the same keys on both sides; only treated: {only_t}, "
                         f"only baseline: {only_b}")
    keys = sorted(treated)
    return keys, np.asarray([treated[k] - baseline[k] for k in keys], np.float64)


def cluster_mean_interval(values, clusters, level: float = 0.95) -> dict:
    """Mean of ``values`` with a Student t interval over cluster means (members of a cluster are correlated)::

        x_c    = mean of the values of cluster c                  (C clusters, e.g. the seeds)
        result = mean_interval(x_1 .. x_C)                         df = C - 1

    The mean is the mean of the cluster means (the grand mean when every cluster has as many members). Use
    it for any number pooled over a swept key (e.g. a loss difference over 4 alphas x 5 seeds: 5 seed means,
    4 degrees of freedom, not 20 members with 19).

    Args:
      values: (n,) numbers.  clusters: (n,) hashable labels (e.g. each member's seed).
      level: the interval's level.
    Returns:
      ``mean_interval``'s dict over the cluster means, plus "df" (C - 1), "members" (n) and "clusters"
      (the labels, sorted).
    Raises:
      ValueError: ``values`` and ``clusters`` differ in length, fewer than 2 clusters, or ``mean_interval``'s.
    """
    x = np.asarray(values, np.float64).ravel()
    labels = list(clusters)
    if len(labels) != len(x):
        raise ValueError(f"values and clusters must have one label per value, got {len(x)} values and "
                         f"{len(labels)} labels")
    keys = sorted(set(labels))
    if len(keys) < 2:
        raise ValueError(f"an interval over cluster means needs at least 2 clusters, got {keys}")
    means = [float(x[[lab == k for lab in labels]].mean()) for k in keys]
    return {**mean_interval(means, level), "df": len(keys) - 1, "members": len(x), "clusters": keys}


def excluded_reduction(baseline_mean: float, low: float) -> float:
    """The relative reduction of a baseline beyond which the interval of a difference excludes it.

    With d = treated - baseline (e.g. mean exit steps), its interval [low, high] and the baseline's mean
    b > 0, a relative reduction r means d = -r b. The interval leaves every d >= low possible and excludes
    every d < low, i.e. it excludes every reduction::

        r > R,    R = -low / b

    R is the largest reduction still compatible with the data; R <= 0 (low >= 0) means every reduction is
    excluded. b is treated as known (its own uncertainty is not propagated), so R is read at the
    interval's level only approximately.

    Raises:
      ValueError: ``baseline_mean`` is not a positive finite number, or ``low`` is not finite.
    """
    if not np.isfinite(baseline_mean) or baseline_mean <= 0:
        raise ValueError(f"baseline_mean must be a positive number, got {baseline_mean}")
    if not np.isfinite(low):
        raise ValueError(f"low must be finite, got {low}")
    return float(-low / baseline_mean)


__all__ = ["t_central", "t_quantile", "mean_interval", "paired_differences", "cluster_mean_interval",
           "excluded_reduction"]
