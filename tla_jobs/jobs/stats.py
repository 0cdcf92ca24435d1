"""Paired statistics for ablations: two arms trained with the same seeds, compared seed by seed.

Written by hand (Student's t distribution through the regularised incomplete beta function, and an
exact sign-flip test) because `tla report` must stay light: scipy is not a dependency of the CLI and
importing it would double the report's start-up. tests/test_stats.py checks every figure against
scipy.
"""

from __future__ import annotations

import itertools
import math
import statistics


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile (q > 0.5) of Student's t, by bisection on the two-sided tail."""
    tail = 2.0 * (1.0 - q)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > tail else (lo, mid)
    return (lo + hi) / 2.0


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip (permutation) test of a zero mean difference: the share of the 2^n
    sign patterns whose |mean| is at least the observed one. Needs no normality; with n pairs its
    smallest possible p is 2 / 2^n (0.0625 for 5 seeds)."""
    n = len(diffs)
    observed = abs(sum(diffs)) - 1e-12
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed
               for signs in itertools.product((1, -1), repeat=n))
    return hits / 2 ** n


def paired(diffs: list[float]) -> dict:
    """Mean of the per-pair differences, its 95% confidence interval (t), the paired t-test and the
    exact sign-flip test. With one pair only the mean is known."""
    n = len(diffs)
    out = {"n": n, "diffs": diffs, "mean": statistics.fmean(diffs) if diffs else None, "std": None,
           "ci95_low": None, "ci95_high": None, "t": None, "p_t": None, "p_sign_flip": None}
    if n < 2:
        return out
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    se = std / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    out.update(std=std, ci95_low=mean - half, ci95_high=mean + half, t=t,
               p_t=1.0 if se == 0 and mean == 0 else t_two_sided_p(t, n - 1),
               p_sign_flip=sign_flip_p(diffs) if n <= 16 else None)
    return out
