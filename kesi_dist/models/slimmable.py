"""A slimmable view of any zoo network: run it at a width vector without rebuilding it (SWP's supernets).

A width vector keeps, in every prunable unit, its first `widths[i]` filters (US-Nets' slicing). With the
filters first sorted by L1 norm (`l1_ordered`), "the first k" are the k most important, so a supernet
trained from a pruned-then-ordered baseline starts with every sub-network equal to its PFEC-style prune.
The view slices the unit's conv filters, its BatchNorm channels and its consumers' input channels as
views of the stored tensors (`torch.func.functional_call`): gradients reach the shared weights, and a
small configuration costs fewer MACs, as a built sub-network would. `materialise` builds that sub-network
(`build_model(arch, widths)` with the sliced weights), so export, plan and reports work on it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from kesi_dist.models.base import PrunableNet
from kesi_dist.pruning.criteria import l1_filter_norms
from kesi_dist.pruning.schedules import align
from kesi_dist.pruning.surgery import slice_units

__all__ = ["l1_ordered", "sliced_tensors", "run_sliced", "materialise", "width_choices", "recalibrate_bn"]


def l1_ordered(model: nn.Module) -> nn.Module:
    """A copy of `model` with every unit's filters permuted by descending L1 norm (its function is
    unchanged: consumers and BatchNorm channels move with them)."""
    convs = dict(model.named_modules())
    keep = {u.name: torch.argsort(l1_filter_norms(convs[u.conv].weight), descending=True, stable=True)
            for u in model.units()}
    return slice_units(model, keep)


def _check(model: nn.Module, widths: Sequence[int]) -> None:
    if not isinstance(model, PrunableNet):
        raise TypeError(f"a slimmable view needs a kesi_dist zoo model, got {type(model).__name__}")
    full = model.widths
    if len(widths) != len(full) or any(not 1 <= int(w) <= c for w, c in zip(widths, full)):
        raise ValueError(f"{model.arch}: widths must be {len(full)} ints, each between 1 and the unit's "
                         f"{full}, got {list(widths)}")


def sliced_tensors(model: nn.Module, widths: Sequence[int], stage: int | None = None) -> dict[str, torch.Tensor]:
    """Name -> view of every parameter and buffer the width vector cuts (units of `stage` only, if given)."""
    _check(model, widths)
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    cut: dict[str, list] = {}  # name -> [kept outputs or None, kept inputs or None] (a conv can be both)
    for u, k, full in zip(model.units(), widths, model.widths):
        if k == full or (stage is not None and u.stage != stage):
            continue
        cut.setdefault(f"{u.conv}.weight", [None, None])[0] = k
        for bn in u.norms:
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                if f"{bn}.{leaf}" in named:
                    cut.setdefault(f"{bn}.{leaf}", [None, None])[0] = k
        for c in u.consumers:
            cut.setdefault(f"{c}.weight", [None, None])[1] = k
    out: dict[str, torch.Tensor] = {}
    for name, (k_out, k_in) in cut.items():
        t = named[name]
        if k_out is not None:
            t = t[:k_out]
        if k_in is not None:
            t = t[:, :k_in]
        out[name] = t
    return out


class _Stage(nn.Module):
    """Calls `net.forward_stage(x, stage)` (or the whole net) so `functional_call` can reparametrise it."""

    def __init__(self, net: nn.Module, stage: int | None):
        super().__init__()
        self.net, self.stage = net, stage

    def forward(self, x):
        return self.net(x) if self.stage is None else self.net.forward_stage(x, self.stage)


def run_sliced(model: nn.Module, x: torch.Tensor, widths: Sequence[int], stage: int | None = None) -> torch.Tensor:
    """`model` (or its stage `stage`) on `x` at the width vector `widths`, without rebuilding it."""
    tensors = {f"net.{k}": v for k, v in sliced_tensors(model, widths, stage).items()}
    return functional_call(_Stage(model, stage), tensors, (x,), strict=False)


def materialise(model: nn.Module, widths: Sequence[int]) -> nn.Module:
    """The sub-network `widths` as a plain zoo model (first `widths[i]` filters of every unit)."""
    _check(model, widths)
    return slice_units(model, {u.name: list(range(int(k))) for u, k in zip(model.units(), widths)})


def width_choices(full: Sequence[int], ratios: Sequence[float], round_to: int = 1) -> list[list[int]]:
    """Per unit, the distinct widths ceil(r x C) for r in `ratios`, ascending (at least 1 channel); with
    `round_to` > 1 each rounded to the nearest multiple (`kesi_dist.pruning.align`, at most C)."""
    if round_to > 1:
        return [sorted({align(math.ceil(r * c - 1e-9), round_to, limit=c) for r in ratios}) for c in full]
    return [sorted({max(1, math.ceil(r * c - 1e-9)) for r in ratios}) for c in full]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over `batches`
    (momentum None, train mode), as US-Nets and AttentiveNAS calibrate a sub-network before evaluating it;
    returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    for x in batches:
        model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()
