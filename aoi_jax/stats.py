"""Small statistics for comparing runs over seeds: Student t intervals and paired differences (numpy only).

A study trains every setting with the same seeds; a setting's effect on a number (e.g. the Top-K mean exit
timestep) is estimated from the per-seed differences against the baseline run of the same seed
(``paired_differences``), summarised as a mean with a Student t interval (``mean_interval``). The t
quantile is computed exactly for integer degrees of freedom from the closed form of the t distribution
(``t_central``), inverted by bisection (``t_quantile``): no table and no scipy.
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


__all__ = ["t_central", "t_quantile", "mean_interval", "paired_differences"]
