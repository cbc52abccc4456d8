"""How well a supernet's proxy accuracy ranks sub-nets by their accuracy after retraining (SWP's claim:
its proxy is "closer to the actual performance"): Kendall's tau-b, Spearman's rho and the mean gap."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["kendall_tau", "spearman_rho", "mean_gap", "summary"]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list allowed; scipy.stats.kendalltau's default); nan when a list is
    constant or shorter than 2."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"lists of {n} and {len(y)} values")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else math.nan


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their mean rank); nan when constant."""
    rx, ry = _ranks(x), _ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


def mean_gap(proxy: Sequence[float], actual: Sequence[float]) -> float:
    """Mean |proxy - actual| (same units as the inputs)."""
    return sum(abs(p - a) for p, a in zip(proxy, actual)) / len(proxy)


def summary(proxy: Sequence[float], actual: Sequence[float]) -> dict:
    """{kendall_tau, spearman_rho, mean_gap} of one supernet's proxies against the retrained accuracies."""
    return {"kendall_tau": kendall_tau(proxy, actual), "spearman_rho": spearman_rho(proxy, actual),
            "mean_gap": mean_gap(proxy, actual)}
