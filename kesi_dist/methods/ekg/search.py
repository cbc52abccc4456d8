"""Pure pieces of EKG's greedy search (shared/design/EKG_SWP.md A.5-A.7; reference sseung0703/EKG).

    unit_cost        what narrowing one unit by its step would remove: the sum of the importance scores
                     of the next channels to go
    trimmed_otsu     the threshold that splits the units' costs into a cheap and a dear class (Otsu's
                     between-class variance on the costs with the lowest and highest 20 % trimmed)
    candidates       the units worth evaluating this step: cost at or below the threshold
    update_knowledge the ensemble target K: the running mean of the logits of the original network and
                     of every accepted sub-network
"""

from __future__ import annotations

import math

import torch

__all__ = ["unit_cost", "trimmed_otsu", "candidates", "update_knowledge", "CLOSED"]

CLOSED = 1e12  # the cost of a unit that cannot narrow further (the reference's)


def unit_cost(scores: torch.Tensor, rate: float, step: float) -> float:
    """Sum of the importance of the channels a step would remove from a unit at width fraction `rate`:
    the scores sorted ascending (removed channels score 0 and come first), positions
    round((1 - rate) C) to round((1 - rate + step) C) (Python's round, as the reference)."""
    if rate <= 0:
        return CLOSED
    s = torch.sort(scores.flatten().double()).values
    c = len(s)
    return float(s[round((1 - rate) * c): round((1 - rate + step) * c)].sum())


def trimmed_otsu(costs: list[float], cut: float = 0.2) -> float:
    """Otsu's threshold over `costs` after dropping the lowest and highest ceil(len * cut) of them.

    The split t maximises t (n - t) (mean(s[:t]) - mean(s[t:]))^2 over the trimmed, sorted costs s,
    t = 1 .. n - 2 (the reference's range); the threshold is the midpoint (s[t-1] + s[t]) / 2.

    Raises:
        ValueError: fewer than 3 costs left after trimming (no split to choose).
    """
    s = sorted(float(c) for c in costs)
    trim = math.ceil(len(s) * cut)
    s = s[trim: len(s) - trim] if trim else s
    if len(s) < 3:
        raise ValueError(f"trimmed Otsu needs at least 3 costs after trimming {trim} from each end, got {len(s)}")
    best, best_t = -1.0, 1
    for t in range(1, len(s) - 1):
        lo, hi = s[:t], s[t:]
        val = t * (len(s) - t) * (sum(lo) / len(lo) - sum(hi) / len(hi)) ** 2
        if val > best:  # the first maximum, as numpy's argmax
            best, best_t = val, t
    return (s[best_t - 1] + s[best_t]) / 2


def candidates(costs: list[float], cut: float = 0.2) -> list[int]:
    """Indices of the open units whose cost is at or below the trimmed Otsu threshold of the open units'
    costs (the trimmed low outliers included); with fewer than 3 open units after trimming, all of them."""
    open_ = [c for c in costs if c < CLOSED]
    try:
        th = trimmed_otsu(open_, cut)
    except ValueError:
        th = max(open_, default=-math.inf)
    return [i for i, c in enumerate(costs) if c < CLOSED and c <= th]


def update_knowledge(knowledge: torch.Tensor, count: int, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """K <- (K * n + logits) / (n + 1): the mean logits of the n networks seen so far and this one."""
    if knowledge.shape != logits.shape:
        raise ValueError(f"knowledge {tuple(knowledge.shape)} and logits {tuple(logits.shape)} differ in shape")
    return (knowledge * count + logits.to(knowledge)) / (count + 1), count + 1
