"""Which interim sub-networks become the memory bank's teachers (the reference code's pick, sseung0703/EKG).

The search's history (the original network and every accepted sub-network except the final one, each
with its holdout loss) is sorted by loss; `num` targets are spread evenly from the lowest loss upward in
steps of (max - min) / num, and each takes the unused entry nearest to it. Teachers come back ordered by
ascending target, so teacher 0 has the lowest loss (the curriculum's best teacher).
"""

from __future__ import annotations

__all__ = ["pick_teachers"]


def pick_teachers(losses: list[float], num: int = 5) -> list[int]:
    """Indices into `losses` of the `num` teachers (all of them when there are at most `num`)."""
    order = sorted(range(len(losses)), key=lambda i: losses[i])
    if len(order) <= num:
        return order
    ranked = [losses[i] + k * 1e-12 for k, i in enumerate(order)]  # ties broken by rank, as the reference
    lo, hi = ranked[0], ranked[-1]
    step = (hi - lo) / num
    targets = [lo + k * step for k in range(num)]  # the reference's np.arange, clamped to `num` values
    free, picked = list(ranked), []
    for t in targets:
        j = min(range(len(free)), key=lambda i: abs(t - free[i]))  # the first nearest, as np.argmin
        picked.append(order[j])
        free[j] = 1e6
    return picked
