"""Small-sample statistics for sweeps over seeds: Student-t confidence intervals and Welch's
t-test (two-sided), from the regularised incomplete beta function, so no SciPy is needed."""
from __future__ import annotations

import math
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (q in (0.5, 1)), by bisection on the two-sided tail."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"q must be in (0.5, 1), got {q}")
    target, lo, hi = 2.0 * (1.0 - q), 0.0, 1.0
    while t_sf2(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_sf2(mid, df) > target else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof 1); NaN for one value (not available)
    ci_low: float  # 95% Student-t interval of the mean; NaN for one value
    ci_high: float


def summarize(values: list[float], level: float = 0.95) -> Summary:
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(values) / n
    if n == 1:  # no spread can be estimated from one value
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's unequal-variance t-test of mean(a) - mean(b): (difference, two-sided p-value).
    The p-value is NaN when either side has fewer than two values or both have no spread."""
    return welch_from_summaries(summarize(a), summarize(b))


def welch_from_summaries(sa: Summary, sb: Summary) -> tuple[float, float]:
    """Welch's test from each side's count, mean and sample standard deviation alone, e.g. two
    cells of results CSVs whose runs are no longer at hand (their top1_mean, top1_std, seeds)."""
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return diff, float("nan")
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0.0:
        return diff, float("nan") if diff == 0 else 0.0
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    return diff, t_sf2(t, df)
