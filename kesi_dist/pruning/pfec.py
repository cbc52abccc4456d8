"""PFEC: structured L1-norm filter pruning (Li et al. 2017, arXiv 1608.08710).

For every prunable unit the filters of its conv are ranked by L1 norm (sum of |w| over
in x kh x kw) and the top `int(C * (1 - ratio))` are kept (never fewer than one). The result is a
physically smaller network rebuilt from the new widths, with the kept filters, their BatchNorm
channels and the matching input channels of the consumer layers copied over. Residual block
outputs are never units, which is how the residual constraint is respected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from kesi_dist.errors import UsageError
from kesi_dist.models import build_model
from kesi_dist.models.base import PrunableNet, Unit

__all__ = ["pfec_prune", "unit_ratios", "kept_count", "l1_keep_indices"]

# int(C * (1 - p)) in floating point gives 62 for C=90, p=0.3 (90 * 0.7 = 62.999...); the epsilon
# makes the rounding the exact decimal one the configs mean.
_EPS = 1e-9


def kept_count(channels: int, ratio: float) -> int:
    """Filters kept when removing `ratio` of `channels`: int(C * (1 - ratio)), at least 1."""
    return max(1, int(channels * (1.0 - ratio) + _EPS))


def _matches(entry: str, name: str) -> bool:
    return name == entry or name.startswith(entry + ".")


def unit_ratios(
    units: list[Unit], stage_ratios: list[float], skip: Iterable[str] = (), layer_ratios: Mapping[str, float] = {},
) -> dict[str, float]:
    """The ratio each unit is pruned by this iteration.

    A unit takes its stage's ratio, unless a `layer_ratios` entry matches it (the entry equals the
    unit name or is a dotted prefix of it; the longest matching entry wins), unless a `skip` entry
    matches it (ratio 0).

    Raises:
        UsageError: `stage_ratios` does not have one value per stage, or a `skip`/`layer_ratios`
            entry names no unit of this model.
    """
    skip = list(skip)
    n_stages = max(u.stage for u in units) + 1
    if len(stage_ratios) != n_stages:
        raise UsageError(
            f"prune.stage_ratios: the model has {n_stages} stages, got {len(stage_ratios)} values {list(stage_ratios)}"
        )
    for field, entries in (("skip", skip), ("layer_ratios", list(layer_ratios))):
        for e in entries:
            if not any(_matches(e, u.name) for u in units):
                examples = ", ".join(u.name for u in units[:3])
                raise UsageError(f"prune.{field}: {e!r} matches no prunable unit of this model (names like {examples})")
    for name, r in layer_ratios.items():
        if not 0 <= r < 1:
            raise UsageError(f"prune.layer_ratios: {name}: must be in [0, 1), got {r}")
    ratios = {}
    for u in units:
        if any(_matches(e, u.name) for e in skip):
            ratios[u.name] = 0.0
            continue
        hits = [e for e in layer_ratios if _matches(e, u.name)]
        ratios[u.name] = float(layer_ratios[max(hits, key=len)]) if hits else float(stage_ratios[u.stage])
    return ratios


def l1_keep_indices(weight: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (ascending) of the `n_keep` output filters of a conv weight with the largest L1 norm."""
    norms = weight.detach().abs().flatten(1).sum(1)
    order = torch.argsort(norms, descending=True, stable=True)
    return order[:n_keep].sort().values


def pfec_prune(
    model: nn.Module, stage_ratios: list[float], skip: Iterable[str] = (), layer_ratios: Mapping[str, float] = {},
) -> nn.Module:
    """Return a new, physically smaller copy of `model` with the lowest-L1 filters of every unit removed.

    Args:
        model: a zoo model (`kesi_dist.models`); it is not modified.
        stage_ratios: fraction of each unit's *current* filters removed, per stage (compounds
            over iterations because it applies to the current width).
        skip: unit names (or dotted prefixes, "layer1.17" covers both bottleneck units) not pruned.
        layer_ratios: per-unit ratio overrides, matched like `skip`.

    Returns:
        A model rebuilt with `build_model(arch, num_classes, new_widths)`, in the same train/eval
        mode as `model`, whose outputs equal those of `model` with the removed filters zeroed.
    """
    if not isinstance(model, PrunableNet):
        raise TypeError(f"pfec_prune needs a kesi_dist zoo model, got {type(model).__name__}")
    units = model.units()
    ratios = unit_ratios(units, stage_ratios, skip, layer_ratios)
    state = model.state_dict()
    out_sel: dict[str, torch.Tensor] = {}  # module -> kept output channels (conv filters, BN channels)
    in_sel: dict[str, torch.Tensor] = {}  # module -> kept input channels
    widths = []
    for u in units:
        weight = state[f"{u.conv}.weight"]
        keep = l1_keep_indices(weight, kept_count(weight.shape[0], ratios[u.name]))
        widths.append(len(keep))
        for m in (u.conv, *u.norms):
            out_sel[m] = keep
        for m in u.consumers:
            in_sel[m] = keep
    with torch.device("meta"):  # structure only; every tensor is assigned from `state` below
        new = build_model(model.arch, model.num_classes, widths)
    new_state = {}
    for key, ref in new.state_dict().items():
        module, _, leaf = key.rpartition(".")
        t = state[key]
        if module in out_sel and t.dim() >= 1:
            t = t.index_select(0, out_sel[module])
        if module in in_sel and leaf == "weight":
            t = t.index_select(1, in_sel[module])
        assert t.shape == ref.shape, f"{key}: {tuple(t.shape)} != {tuple(ref.shape)}"
        new_state[key] = t.clone()
    new.load_state_dict(new_state, assign=True)
    return new.train(model.training)
