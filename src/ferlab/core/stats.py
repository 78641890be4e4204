"""The statistics behind every claim: intervals, paired tests and their correction for many comparisons.

>>> round(wilson(90, 100)[0], 3), round(mcnemar_exact([True, True, False], [False, False, False])[2], 3)
(0.826, 0.5)
>>> holm([0.01, 0.04, 0.03])
[0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = 1.959964


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); sound for small n and p near 1."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a_right: Sequence[bool], b_right: Sequence[bool]) -> tuple[int, int, float]:
    """(A right & B wrong, A wrong & B right, two-sided exact p) on paired predictions."""
    b = sum(x and not y for x, y in zip(a_right, b_right))
    c = sum(y and not x for x, y in zip(a_right, b_right))
    n = b + c
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return b, c, min(1.0, 2 * tail)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): reject where adjusted p < alpha, with the
    family-wise error rate held at alpha across all the comparisons."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * pvalues[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def mcnemar_holm(right: dict[str, dict[str, bool]]) -> list[dict]:
    """Every pair of models compared on the items both answered: ``right[model][item]`` says whether ``model``
    got ``item`` right. One dict per pair, in order (a, b): ``model_a``, ``model_b``, ``a_right_b_wrong``,
    ``a_wrong_b_right``, ``n`` (shared items), the exact McNemar ``mcnemar_p`` and its Holm-corrected ``holm_p``
    over all the pairs (the family-wise error held across them)."""
    names = list(right)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = [k for k in right[a] if k in right[b]]
            n_ab, n_ba, p = mcnemar_exact([right[a][k] for k in shared], [right[b][k] for k in shared])
            rows.append(
                {
                    "model_a": a,
                    "model_b": b,
                    "a_right_b_wrong": n_ab,
                    "a_wrong_b_right": n_ba,
                    "n": len(shared),
                    "mcnemar_p": p,
                }
            )
    for row, adjusted in zip(rows, holm([r["mcnemar_p"] for r in rows])):
        row["holm_p"] = adjusted
    return rows


def t_quantile(df: int, q: float = 0.975) -> float:
    """Student's t quantile (two-sided 95% by default), from the inverse regularized incomplete beta by bisection:
    exact enough for intervals and free of a SciPy dependency."""
    if df <= 0:
        return math.inf

    def cdf(t: float) -> float:
        x = df / (df + t * t)
        return 1 - 0.5 * _betainc(df / 2, 0.5, x)

    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1 + num / (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(1 - c * d) < 1e-12:
            break
    return front * (f - 1) / a


def mean_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, standard deviation, 95% interval low, high) by Student's t; a single value has no interval."""
    n = len(values)
    mean = statistics.fmean(values) if n else float("nan")
    if n < 2:
        return mean, 0.0, float("nan"), float("nan")
    sd = statistics.stdev(values)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half
