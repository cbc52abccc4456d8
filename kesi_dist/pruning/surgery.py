"""How to cut: turn kept filter indices per prunable unit into a physically smaller zoo model.

Whatever ranks the filters (PFEC's L1 norm, or EKG's and SWP's own criteria), the cut is the same:
rebuild the net from its new widths, then copy the kept filters, their BatchNorm channels and the
matching input channels of every consumer layer. Residual block outputs are never units, which is
how the residual constraint is respected. The result rebuilds anywhere from (arch, widths).

A torchvision/timm network (`GraphNet`) is cut by Torch-Pruning through its dependency graph, every
layer of each unit's group at once (`kesi_dist.models.graphnet.cut_graph_net`); its result rebuilds from
(arch, widths, options) the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kesi_dist.models import build_model
from kesi_dist.models.base import PrunableNet
from kesi_dist.models.graphnet import GraphNet, cut_graph_net

__all__ = ["slice_units"]


def _indices(name: str, idx: torch.Tensor | Sequence[int], channels: int) -> torch.Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long)
    if idx.dim() != 1 or not 1 <= idx.numel() <= channels:
        raise ValueError(f"keep[{name!r}]: need 1 to {channels} indices in a 1-D tensor, got shape {tuple(idx.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= channels or idx.unique().numel() != idx.numel():
        raise ValueError(f"keep[{name!r}]: indices must be distinct and in [0, {channels}), got {idx.tolist()[:8]}")
    return idx


def slice_units(model: nn.Module, keep: Mapping[str, torch.Tensor | Sequence[int]]) -> nn.Module:
    """Return a new, physically smaller copy of `model` keeping only the given filters of each unit.

    Args:
        model: a zoo model (`kesi_dist.models`); it is not modified.
        keep: unit name (`model.units()`) -> indices of the output filters of its conv to keep.
            Units left out keep all their filters. Indices are used in the order given (ascending
            keeps the original channel order; a `GraphNet` takes ascending indices only).

    Returns:
        A model rebuilt with `build_model(arch, num_classes, new_widths)`, in the same train/eval
        mode as `model`, whose outputs equal those of `model` with the other filters zeroed.
    """
    if not isinstance(model, PrunableNet):
        raise TypeError(f"slice_units needs a kesi_dist zoo model, got {type(model).__name__}")
    units = model.units()
    unknown = sorted(set(keep) - {u.name for u in units})
    if unknown:
        raise ValueError(f"keep names units {type(model).__name__} {model.arch} does not have: {unknown[:3]}")
    state = model.state_dict()
    out_sel: dict[str, torch.Tensor] = {}  # module -> kept output channels (conv filters, BN channels)
    in_sel: dict[str, torch.Tensor] = {}  # module -> kept input channels
    widths = []
    for u in units:
        channels = state[f"{u.conv}.weight"].shape[0]
        if u.name not in keep:
            widths.append(channels)
            continue
        idx = _indices(u.name, keep[u.name], channels)
        widths.append(idx.numel())
        for m in (u.conv, *u.norms):
            out_sel[m] = idx
        for m in u.consumers:
            in_sel[m] = idx
    if isinstance(model, GraphNet):
        return cut_graph_net(model, {u.name: out_sel[u.conv] for u in units if u.name in keep})
    with torch.device("meta"):  # structure only; every tensor is assigned from `state` below
        new = build_model(model.arch, model.num_classes, widths, **getattr(model, "options", {}))
    new_state = {}
    for key, ref in new.state_dict().items():
        module, _, leaf = key.rpartition(".")
        t = state[key]
        if module in out_sel and t.dim() >= 1:
            t = t.index_select(0, out_sel[module].to(t.device))
        if module in in_sel and leaf == "weight":
            t = t.index_select(1, in_sel[module].to(t.device))
        assert t.shape == ref.shape, f"{key}: {tuple(t.shape)} != {tuple(ref.shape)}"
        new_state[key] = t.clone()
    new.load_state_dict(new_state, assign=True)
    return new.train(model.training)
