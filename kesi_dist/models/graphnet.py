"""A torchvision/timm network in the zoo's contract: `.arch`, `.widths`, `.num_classes`, `.units()`, `.options`.

    model = GraphNet("torchvision:resnet50", num_classes=10, resolution=224)
    small = GraphNet("torchvision:resnet50", 10, widths=model_widths, resolution=224)   # then load_state_dict

A `GraphNet` is rebuilt from (arch, widths, num_classes, resolution) by building the source network
(`kesi_dist.models.sources`), tracing it (`kesi_dist.models.graph`) and cutting every unit to its first
`width` channels; a network cut anywhere else (`cut_graph_net`, keeping any channels) has the same shapes,
so its state dict loads into the rebuild, and checkpoints, exports and resume work as for the zoo.
`check_prunable` refuses, before any training, a network the graph cannot cut.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kesi_dist.errors import UsageError
from kesi_dist.models.base import PrunableNet, Unit, check_widths
from kesi_dist.models.graph import Graph, device_of, layout, refusal, run_naming_layer, trace
from kesi_dist.models.sources import build_source, head_paths

__all__ = ["GraphNet", "cut_graph_net", "check_prunable"]


_PLACES: dict[str, dict] = {}  # arch -> layout of its unpruned network (cutting does not change it)


def _places(model: "GraphNet") -> dict:
    if model.arch not in _PLACES:
        ignored = [m for h in model.head_modules for m in model.get_submodule(h).modules()]
        try:
            _PLACES[model.arch] = layout(model, ignored)
        except Exception:  # noqa: BLE001 - a network that only runs at its own input size
            _PLACES[model.arch] = layout(model, ignored, model.resolution)
    return _PLACES[model.arch]


class GraphNet(PrunableNet):
    """A torchvision/timm network as a zoo model: `.arch`, `.widths`, `.num_classes`, `.units()`, `.options`.

    The source network is `self.net` (state-dict keys "net.<its own key>"); `resolution` is the input side
    it is traced at (saved with checkpoints as an option).
    """

    def __init__(self, arch: str, num_classes: int = 1000, widths: list | None = None, resolution: int = 224):
        super().__init__(arch, [], num_classes)
        self._build(widths, resolution)

    @classmethod
    def traced(cls, arch: str, num_classes: int, widths: list | None, resolution: int,
               empty: bool = False) -> tuple["GraphNet", Graph]:
        """The model and its live graph (to cut it further; the graph is not kept on the model). `empty`:
        built under the meta device, it stays on the uninitialised CPU memory it was traced on (moving it
        would replace the parameters the graph holds)."""
        model = cls.__new__(cls)
        PrunableNet.__init__(model, arch, [], num_classes)
        return model, model._build(widths, resolution, empty)

    def _build(self, widths: list | None, resolution: int, empty: bool = False) -> Graph:
        if not isinstance(resolution, int) or isinstance(resolution, bool) or not 8 <= resolution <= 4096:
            raise UsageError(f"{self.arch}: resolution must be an int between 8 and 4096 px, got {resolution!r}")
        self.resolution = resolution
        self.net = build_source(self.arch, self.num_classes)
        self.head_modules = tuple(f"net.{h}" for h in head_paths(self.arch))
        meta = device_of(self).type == "meta"
        if meta:  # a structure-only skeleton: trace it on uninitialised CPU memory (the meta device runs
            self.to_empty(device="cpu")  # BatchNorm through slow Python decompositions), then drop it
        graph = trace(self, resolution, self.head_modules, self.arch, strip="net.", places=_places(self))
        widths = check_widths(self.arch, widths, graph.widths)
        too_wide = [(u.name, w, c) for u, w, c in zip(graph.units, widths, graph.widths) if w > c]
        if too_wide:
            name, w, c = too_wide[0]
            raise UsageError(f"{self.arch}: widths: unit {name} has {c} channels, got width {w}")
        for u, w, c in zip(graph.units, widths, graph.widths):
            if w < c:
                graph.cut(u.name, range(w))
        self.widths, self._units = list(widths), list(graph.units)
        if meta and not empty:
            self.to("meta")
        return graph

    def units(self) -> list[Unit]:
        return list(self._units)

    @property
    def options(self) -> dict:
        return {"resolution": self.resolution}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def cut_graph_net(model: GraphNet, keep: Mapping[str, Sequence[int]]) -> GraphNet:
    """A new `GraphNet` with only the channels `keep[name]` (ascending) of each named unit: rebuilt from
    `model`'s widths, loaded with its state dict, then cut through the rebuild's own graph (the graph
    of the full network, so every unit keeps its group however narrow it gets). On `model`'s device."""
    new, graph = GraphNet.traced(model.arch, model.num_classes, list(model.widths), model.resolution)
    new.load_state_dict(model.state_dict())
    widths = list(model.widths)
    for i, u in enumerate(new.units()):
        if u.name not in keep:
            continue
        idx = [int(k) for k in keep[u.name]]
        if idx != sorted(idx):
            raise ValueError(f"keep[{u.name!r}]: a graph network keeps channels in their order; give ascending "
                             f"indices, got {idx[:8]}")
        graph.cut(u.name, idx)
        widths[i] = len(idx)
    new.widths = widths
    return new.to(device_of(model)).train(model.training)


@functools.lru_cache(maxsize=32)
def check_prunable(arch: str, resolution: int = 224) -> None:
    """Refuse `arch` (a torchvision/timm name) unless its graph can cut every unit: on uninitialised
    weights every unit is cut to half its channels and the network must still run to `num_classes`
    outputs. When it does not, the units are cut again one at a time to name the one
    whose cut breaks it.

    Raises:
        UsageError: one line naming the layer the network fails at (and the unit whose cut broke it).
    """
    classes = 10
    x = torch.zeros(1, 3, resolution, resolution)
    for hunt in (False, True):
        with torch.device("meta"):  # values do not matter, shapes do: uninitialised CPU memory
            model, graph = GraphNet.traced(arch, classes, None, resolution, empty=True)
        model.eval()
        for u, c in zip(graph.units, graph.widths):
            try:
                graph.cut(u.name, range(max(1, c // 2)))
            except Exception as e:  # noqa: BLE001 - the tracer's own assertion on a layer it cannot cut
                raise refusal(arch, f"unit {u.name} ({u.conv.removeprefix('net.')})",
                              f"Torch-Pruning cannot cut it ({type(e).__name__}: {str(e)[:160]})") from None
            if hunt:
                out, layer, why = run_naming_layer(model, x)
                if out is None:
                    raise refusal(arch, layer, f"fails once unit {u.name} is cut ({why}): the graph misses a "
                                  "coupling there")
        out, layer, why = run_naming_layer(model, x)
        if out is not None and tuple(out.shape) == (1, classes):
            return
    raise refusal(arch, layer or "its output", why or f"has shape {tuple(out.shape)} once cut, not (1, {classes})")
