"""How much to prune: pure functions from a schedule (and the model's units) to counts and ratios.

Nothing here looks at weights; `criteria` decides which entries go, `surgery`/`masks` remove them.
Errors about a schedule are `BadValue` naming the argument, for the config layer to map to a key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from kesi_dist.errors import BadValue
from kesi_dist.models.base import Unit

__all__ = ["kept_count", "align", "aligned_count", "unit_ratios", "sparsity_target", "uniform_widths"]

# int(C * (1 - p)) in floating point gives 62 for C=90, p=0.3 (90 * 0.7 = 62.999...); the epsilon
# makes the rounding the exact decimal one the configs mean.
_EPS = 1e-9


def kept_count(channels: int, ratio: float) -> int:
    """Filters kept when removing `ratio` of `channels`: int(C * (1 - ratio)), at least 1."""
    return max(1, int(channels * (1.0 - ratio) + _EPS))


def align(count: float, round_to: int, limit: int | None = None) -> int:
    """`count` rounded to the nearest multiple of `round_to` (halves up), never below one multiple, never
    above `limit` (rounded down to a multiple when `limit` has one; `limit` itself when it is smaller)."""
    n = int(round_to)
    if n < 1:
        raise BadValue("round_to", f"must be >= 1, got {round_to}")
    k = max(n, n * int(count / n + 0.5 + _EPS))
    if limit is not None and k > limit:
        k = max(n, n * (int(limit) // n)) if limit >= n else int(limit)
    return k


def aligned_count(full: int, current: int, ratio: float, iteration: int, round_to: int) -> int:
    """Filters a unit keeps at 1-based `iteration` of a PFEC chain whose widths are multiples of `round_to`.

    The paper's chain removes `ratio` of the current filters each iteration (`kept_count`, compounding from
    the unpruned `full`); the aligned chain keeps that width rounded to the nearest multiple (`align`),
    never more than `current`. Rounding the paper's width rather than the aligned one keeps the chain
    moving: 16 -> 14.4 -> 16 again would stall a unit forever. `round_to=1` is the paper's chain.
    """
    if round_to == 1:
        return kept_count(current, ratio)
    paper = int(full)
    for _ in range(iteration):
        paper = kept_count(paper, ratio)
    return align(paper, round_to, limit=current)


def _matches(entry: str, name: str) -> bool:
    return name == entry or name.startswith(entry + ".")


def unit_ratios(
    units: list[Unit], stage_ratios: Sequence[float], skip: Iterable[str] = (), layer_ratios: Mapping[str, float] = {},
    stream: bool = True,
) -> dict[str, float]:
    """The ratio each unit is pruned by this iteration.

    A unit takes its stage's ratio, unless a `layer_ratios` entry matches it (the entry equals the
    unit name or is a dotted prefix of it; the longest matching entry wins), unless a `skip` entry
    matches it (ratio 0). With `stream=False` every stream unit (channels summed by residual additions,
    `Unit.kind`) keeps its filters too: PFEC (Li et al. 2017, sec. 3.4) prunes only a residual block's
    first layer and leaves the identity-mapped channels alone; the zoo has no stream units.

    Raises:
        BadValue: `stage_ratios` does not have one value per stage, a `skip`/`layer_ratios` entry
            names no unit of this model, or a `layer_ratios` value is outside [0, 1).
    """
    skip = list(skip)
    n_stages = max(u.stage for u in units) + 1
    if len(stage_ratios) != n_stages:
        raise BadValue(
            "stage_ratios", f"the model has {n_stages} stages, got {len(stage_ratios)} values {list(stage_ratios)}"
        )
    for arg, entries in (("skip", skip), ("layer_ratios", list(layer_ratios))):
        for e in entries:
            if not any(_matches(e, u.name) for u in units):
                examples = ", ".join(u.name for u in units[:3])
                raise BadValue(arg, f"{e!r} matches no prunable unit of this model (names like {examples})")
    for name, r in layer_ratios.items():
        if not 0 <= r < 1:
            raise BadValue("layer_ratios", f"{name}: must be in [0, 1), got {r}")
    ratios = {}
    for u in units:
        if any(_matches(e, u.name) for e in skip) or (not stream and u.kind == "stream"):
            ratios[u.name] = 0.0
            continue
        hits = [e for e in layer_ratios if _matches(e, u.name)]
        ratios[u.name] = float(layer_ratios[max(hits, key=len)]) if hits else float(stage_ratios[u.stage])
    return ratios


def sparsity_target(targets: Sequence[float], iteration: int) -> float:
    """The cumulative MWP sparsity after 1-based `iteration`: `targets[iteration - 1]`."""
    if iteration < 1:
        raise ValueError(f"iteration is 1-based, got {iteration}")
    if iteration > len(targets):
        raise BadValue("targets", f"iteration {iteration} needs a target, only {len(targets)} given {list(targets)}")
    return float(targets[iteration - 1])


def uniform_widths(full: Sequence[int], macs, target: float, round_to: int = 1) -> list[int]:
    """The widest uniformly pruned widths (every unit keeps max(1, round(f C)) of its C channels, one f
    for all; with `round_to` > 1 that count `align`ed to a multiple) whose MACs (`macs(widths)`, e.g.
    `counting.macs_function`) are at most `target` x the unpruned ones: the comparison arm of a search
    at equal MACs."""
    full = [int(c) for c in full]
    budget = target * macs(full)

    def widths(f: float) -> list[int]:
        if round_to > 1:
            return [align(f * c, round_to, limit=c) for c in full]
        return [max(1, round(f * c)) for c in full]

    if macs(widths(0.0)) > budget:
        raise BadValue("target", f"{target}: even one channel per unit has more MACs than that")
    lo, hi = 0.0, 1.0  # macs(widths(lo)) <= budget < macs(widths(hi)); widths grow with f
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(widths(mid)) <= budget else (lo, mid)
    return widths(lo)
