"""The statistics of a study: mean ± sample std, Welch's two-sided t-test (no SciPy) and Holm's correction."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["betainc", "holm", "mean_std", "welch_t"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 in the denominator; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, Numerical Recipes §6.4)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d, f = 1e-300, 1.0, 0.0, 1.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d, c = 1.0 + num * d, 1.0 + num / c
        d, c = 1.0 / (d if abs(d) > tiny else tiny), (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's two-sample t-test (unequal variances): statistic, Welch–Satterthwaite dof, two-sided p-value.

    The p-value is ``I_{df/(df+t²)}(df/2, 1/2)`` (the t distribution's two tails); no SciPy needed. Two samples
    without spread give p = 1 when their means are equal and p = 0 otherwise; each sample needs n ≥ 2.
    """
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, math.nan
    va, vb = sa**2 / len(a), sb**2 / len(b)
    if va + vb == 0.0:
        return (0.0, math.inf, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), math.inf, 0.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, betainc(df / 2.0, 0.5, df / (df + t * t))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down; family-wise error rate), in the input order.

    An undefined p-value (NaN: a sample with fewer than two values) is no test: it stays NaN and does not count
    in the family size.
    """
    tested = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(tested, key=lambda i: pvalues[i])
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
