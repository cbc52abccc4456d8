"""Prunable units of any traced network, from Torch-Pruning's dependency graph (Fang et al., "DepGraph:
Towards Any Structural Pruning", CVPR 2023; github.com/VainF/Torch-Pruning).

The graph groups every conv/linear output channel with all the layers that must be cut with it; each
group is a `Unit` of one kind:
  inner      one producing conv (a block's internal width, e.g. ResNet's conv1/conv2, an SE reduction);
  stream     several producers summed by residual additions, projection shortcuts included;
  depthwise  an expansion conv with the depthwise conv(s) that carry its channels (inverted residuals).
A unit is named by the shortest module path that tells it from the other units ("layer3.1",
"layer3.1.conv2", "features.4"), a stream by its first producer ("conv1", "layer2.0.conv3",
"features.2.conv.2"), so `skip: [layer2]` covers a whole stage and a stream's own name covers it alone.
Its stage is the rank (largest first) of the spatial size where it is computed (a stream: produced) in a
128 px forward pass, so stages do not depend on the training resolution.
The classifier head is never a producer (its inputs are cut with the unit that feeds it).

`kesi_dist.models.graphnet.GraphNet` puts a torchvision/timm network in the zoo's contract with these
units. Torch-Pruning's own (pickled) module state is never stored: a cut network rebuilds from its widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from kesi_dist.errors import UsageError

if TYPE_CHECKING:
    import torch_pruning as tp
from kesi_dist.models.base import Unit

__all__ = ["Graph", "trace", "layout", "STAGE_RESOLUTION", "device_of", "refusal", "run_naming_layer"]

STAGE_RESOLUTION = 128
_CONV, _NORM = nn.modules.conv._ConvNd, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def device_of(net: nn.Module) -> torch.device:
    t = next(iter(net.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def refusal(arch: str, layer: str, why: str) -> UsageError:
    return UsageError(f"{arch}: cannot prune it: {layer}: {why}")


def run_naming_layer(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, str, str]:
    """(output, "", "") or (None, the innermost layer the forward pass failed in, the error in one line)."""
    stack: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_pre_hook(lambda mod, inp, name=name: stack.append(name)))
            handles.append(m.register_forward_hook(lambda mod, inp, out: stack.pop() and None))
    try:
        with torch.no_grad():
            return model(x), "", ""
    except Exception as e:  # noqa: BLE001 - any failure of the cut network, named by its layer
        failed = stack[-1:]
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return None, (failed[0].removeprefix("net.") if failed else "the network"), f"{type(e).__name__}: {detail}"
    finally:
        for h in handles:
            h.remove()


def layout(net: nn.Module, skip: Sequence[nn.Module] = (), resolution: int = STAGE_RESOLUTION) -> dict:
    """module path -> (order of its first call, output positions) of every conv/linear but `skip`, from a
    forward pass of `net`'s structure on zeros (on the CPU, whatever device `net` is on, meta included).
    A layer whose output is 1 x 1 while the feature map around it is not (squeeze-excitation, a pooled
    branch) takes the positions of the layer run before it."""
    seen: dict[str, tuple[int, int]] = {}
    handles = []
    for name, m in net.named_modules():
        if isinstance(m, (_CONV, nn.Linear)) and m not in skip:
            def hook(mod, inputs, out, name=name):
                out = out[0] if isinstance(out, (tuple, list)) else out
                c = mod.out_channels if isinstance(mod, _CONV) else mod.out_features
                seen.setdefault(name, (len(seen), out.numel() // max(1, out.shape[0] * c)))
            handles.append(m.register_forward_hook(hook))
    zeros = {k: torch.zeros(v.shape, dtype=v.dtype, device="cpu")
             for k, v in (*net.named_parameters(), *net.named_buffers())}
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            functional_call(net, zeros, (torch.zeros(1, 3, resolution, resolution, device="cpu"),))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    last, out = 1, {}
    for name, (order, positions) in sorted(seen.items(), key=lambda kv: kv[1][0]):
        last = positions if positions > 1 else last
        out[name] = (order, last)
    return out


def _shortest_unique(paths: list[str]) -> list[str]:
    """For each dotted path, its shortest prefix (whole components) that no other path starts with."""
    parts = [p.split(".") for p in paths]
    names = []
    for i, p in enumerate(parts):
        for k in range(1, len(p) + 1):
            if not any(j != i and q[:k] == p[:k] for j, q in enumerate(parts)):
                break
        names.append(".".join(p[:k]))
    return names


@dataclass
class _Group:
    root: nn.Module
    channels: int
    producers: list[str]
    norms: list[str]
    consumers: dict[str, int]  # path -> input channels it reads per unit channel
    kind: str
    leading: str
    order: int
    key: int  # positions its channels are produced at


@dataclass
class Graph:
    """A traced network: its units (in forward order), their full widths, and `cut` on the traced modules."""

    dg: tp.DependencyGraph
    units: list[Unit]
    widths: list[int]
    roots: dict[str, nn.Module]

    def cut(self, name: str, keep: Sequence[int]) -> None:
        """Keep only the channels `keep` (ascending) of unit `name`, in every layer of its group, in place."""
        root = self.roots[name]
        channels = root.out_channels if isinstance(root, _CONV) else root.out_features
        remove = sorted(set(range(channels)) - {int(i) for i in keep})
        if remove:
            self.dg.get_pruning_group(root, self.dg.get_pruner_of_module(root).prune_out_channels, remove).prune()


def trace(net: nn.Module, resolution: int, head: Sequence[str], arch: str = "", strip: str = "",
          places: dict | None = None) -> Graph:
    """Trace `net` on a `resolution`-px input and return its units; `head` (module paths) is never pruned.
    Unit names drop the prefix `strip` ("net." for a `GraphNet`); their layer paths are `net`'s own.
    `places` is `layout(net)` when already known (it does not change when units are cut).

    Raises:
        UsageError: the network cannot be traced, or holds a layer the graph cannot cut (one line naming it).
    """
    # Imported here, not at the top: torch_pruning imports timm, seconds that every `kesi` command (and
    # every zoo network, which needs no graph) would pay at start-up.
    import torch_pruning as tp

    arch = arch or type(net).__name__
    modules = dict(net.named_modules())
    names = {m: n for n, m in modules.items()}
    heads = [modules[h] for h in head if h in modules]
    ignored = [m for h in heads for m in h.modules() if isinstance(m, (_CONV, nn.Linear))]
    was_training = net.training
    try:
        x = torch.zeros(1, 3, resolution, resolution, device=device_of(net))
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(net, example_inputs=x, verbose=False)
    except Exception as e:  # noqa: BLE001 - whatever the forward or the tracer raises, in one line
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        out, layer, why = run_naming_layer(net.eval(), x)
        if out is None:
            raise refusal(arch, layer, f"fails on a {resolution} px input ({why})") from None
        raise refusal(arch, f"its {resolution} px trace", f"Torch-Pruning cannot follow it ({type(e).__name__}: "
                      f"{detail})") from None
    finally:
        net.train(was_training)
    if places is None:
        try:
            places = layout(net, ignored)
        except Exception:  # noqa: BLE001 - a network that only runs at its own input size
            places = layout(net, ignored, resolution)
    groups = []
    for g in dg.get_all_groups(ignored_layers=ignored, root_module_types=[_CONV, nn.Linear]):
        groups.append(_group(g, dg, names, modules, places, arch))
    groups.sort(key=lambda g: g.order)
    keys = sorted({g.key for g in groups}, reverse=True)
    unit_names = _names(groups, strip)
    units = [Unit(n, keys.index(g.key), g.leading, tuple(g.norms), tuple(g.consumers), kind=g.kind,
                  producers=tuple(p for p in g.producers if p != g.leading),
                  consumer_fan=tuple(g.consumers.values()))
             for n, g in zip(unit_names, groups)]
    return Graph(dg, units, [g.channels for g in groups], {u.name: g.root for u, g in zip(units, groups)})


def _group(g, dg, names: dict, modules: dict, places: dict, arch: str) -> _Group:
    from torch_pruning.ops import _ElementWiseOp  # see `trace`

    producers, norms, consumers, has_add = [], [], {}, False
    channels = len(g[0].idxs)
    for dep, idxs in g:
        m, out = dep.target.module, dg.is_out_channel_pruning_fn(dep.handler)
        path = names.get(m) if isinstance(m, nn.Module) else None
        if isinstance(m, _CONV) and m.groups > 1 and not _depthwise(m):
            raise refusal(arch, (path or "a layer").removeprefix("net."),
                          f"grouped convolution (groups={m.groups}) is not supported")
        if isinstance(m, _ElementWiseOp) and str(m._grad_fn).startswith(("Add", "Sub")):
            has_add = True
        if path is None:
            continue
        if isinstance(m, (_CONV, nn.Linear)) and (out or _depthwise(m)):
            producers.append(path)
        elif isinstance(m, (_CONV, nn.Linear)):
            consumers[path] = consumers.get(path, 0) + len(idxs) // channels
        elif out and isinstance(m, _NORM):
            norms.append(path)
    order = lambda p: places.get(p, (1 << 30, 0))[0]  # noqa: E731 - layers never run (aux heads) last
    producers = sorted(dict.fromkeys(producers), key=order)
    norms = list(dict.fromkeys(norms))
    whole = [p for p in producers if not _depthwise(modules[p])]
    leading = (whole or producers)[0]
    kind = "stream" if has_add and len(whole) > 1 else "depthwise" if len(whole) < len(producers) else "inner"
    # A stream's consumers open the next stage; an inner unit sits where its block computes (ResNet-50's
    # stride is in conv2, so layer2.0.conv1 belongs with layer2 by its consumer).
    placed = producers if kind == "stream" else [*producers, *consumers]
    key = min((places[p][1] for p in placed if p in places), default=0)
    return _Group(modules[leading], channels, producers, norms, consumers, kind, leading, order(leading), key)


def _names(groups: list[_Group], strip: str) -> list[str]:
    def short(path: str) -> str:
        return path[len(strip):] if strip and path.startswith(strip) else path

    plain = [i for i, g in enumerate(groups) if g.kind != "stream"]
    names = [short(g.leading) for g in groups]  # a stream: its first producer, which no other name extends
    for i, n in zip(plain, _shortest_unique([names[i] for i in plain])):
        names[i] = n
    assert len(set(names)) == len(names), names
    return names
