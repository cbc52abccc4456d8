"""PFEC: structured L1-norm filter pruning (Li et al. 2017, arXiv 1608.08710).

For every prunable unit the filters of its conv are ranked by L1 norm and the top
`int(C * (1 - ratio))` are kept (never fewer than one); the net is then cut to those filters.
Schedule, criterion and surgery live in `schedules`, `criteria` and `surgery`; this is their sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from kesi_dist.models import default_widths
from kesi_dist.models.base import PrunableNet
from kesi_dist.pruning.criteria import l1_keep_indices
from kesi_dist.pruning.schedules import aligned_count, unit_ratios
from kesi_dist.pruning.surgery import slice_units

__all__ = ["pfec_prune"]


def pfec_prune(
    model: nn.Module, stage_ratios: Sequence[float], skip: Iterable[str] = (), layer_ratios: Mapping[str, float] = {},
    *, round_to: int = 1, iteration: int = 1, stream: bool = True,
) -> nn.Module:
    """Return a new, physically smaller copy of `model` with the lowest-L1 filters of every unit removed.

    Args:
        model: a zoo model (`kesi_dist.models`); it is not modified.
        stage_ratios: fraction of each unit's *current* filters removed, per stage (compounds
            over iterations because it applies to the current width).
        skip: unit names (or dotted prefixes, "layer1.17" covers both bottleneck units) not pruned.
        layer_ratios: per-unit ratio overrides, matched like `skip`.
        round_to: every kept count a multiple of this (`aligned_count`: the paper chain's width at
            `iteration`, rounded to the nearest multiple); 1 keeps the paper's counts.
        iteration: 1-based index of this pruning step in its chain (used only when `round_to` > 1).
        stream: False keeps every stream unit (residual-summed channels of a graph network) whole
            (see `unit_ratios`).

    Returns:
        See `slice_units`: same train/eval mode, outputs equal to `model`'s with the removed filters zeroed.

    Raises:
        BadValue: a bad `stage_ratios`, `skip` or `layer_ratios` (see `unit_ratios`).
    """
    if not isinstance(model, PrunableNet):
        raise TypeError(f"pfec_prune needs a kesi_dist zoo model, got {type(model).__name__}")
    units = model.units()
    ratios = unit_ratios(units, list(stage_ratios), skip, layer_ratios, stream)
    # Each conv is ranked on its own original weights (PFEC's "independent" strategy).
    convs = dict(model.named_modules())
    full = default_widths(model.arch) if round_to > 1 else [None] * len(units)
    keep = {}
    for u, c in zip(units, full):
        weight = convs[u.conv].weight
        n = aligned_count(c, weight.shape[0], ratios[u.name], iteration, round_to)
        keep[u.name] = l1_keep_indices(weight, n)
    return slice_units(model, keep)
