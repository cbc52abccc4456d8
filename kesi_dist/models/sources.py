"""Networks from a source library, named "torchvision:<name>" or "timm:<name>", built with random weights.

    net = build_source("torchvision:resnet50", num_classes=10)       # torchvision.models.get_model
    net = build_source("timm:efficientnet_b0", num_classes=10)      # timm.create_model (optional extra)

Nothing is ever downloaded: torchvision builds with `weights=None`, timm with `pretrained=False`; trained
weights come from a file the user names (`kesi_dist.models.weights`). The classifier head is found by
building the network twice (on the meta device) with two class counts and keeping the layers whose
shapes differ, which holds for any network whose builder takes `num_classes`.
"""

from __future__ import annotations

import difflib
import functools

import torch
from torch import nn

from kesi_dist.errors import BadValue, UsageError

__all__ = ["SOURCES", "is_source_arch", "source_problem", "build_source", "head_paths"]

SOURCES = ("torchvision", "timm")
TIMM_HINT = "pip install 'kesi_dist[timm]'"


def is_source_arch(arch) -> bool:
    """True for "torchvision:<name>" and "timm:<name>" (not for the zoo's own names)."""
    return isinstance(arch, str) and arch.partition(":")[0] in SOURCES and bool(arch.partition(":")[2])


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError(f"timm networks need the timm extra: {TIMM_HINT}") from None
    return timm


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}? " if close else ""


@functools.lru_cache(maxsize=64)
def source_problem(arch: str) -> str | None:
    """Why `arch` cannot be built (unknown library or name, timm not installed), in one line; None if it can."""
    lib, _, name = arch.partition(":")
    if lib not in SOURCES or not name:
        return f"unknown model {arch!r}: a zoo name, torchvision:<name> or timm:<name>"
    if lib == "torchvision":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)  # image classification only
        if name not in names:
            return (f"{arch}: torchvision has no classification model {name!r}; {_suggest(name, names)}"
                    "torchvision.models.list_models() lists them")
        return None
    try:
        timm = _timm()
    except UsageError as e:
        return f"{arch}: {e}"
    if not timm.is_model(name):
        return f"{arch}: timm has no model {name!r}; {_suggest(name, timm.list_models())}timm.list_models() lists them"
    return None


def _construct(arch: str, num_classes: int) -> nn.Module:
    lib, _, name = arch.partition(":")
    if lib == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return _timm().create_model(name, pretrained=False, num_classes=num_classes)


def build_source(arch: str, num_classes: int) -> nn.Module:
    """The network `arch` with `num_classes` outputs and the library's own random initialisation, on the
    default device (the meta device inside `with torch.device("meta")`).

    Raises:
        UsageError: unknown library or name, or timm missing (one line naming the fix).
    """
    problem = source_problem(arch)
    if problem:
        raise UsageError(problem)
    meta = torch.empty(0).is_meta
    try:
        net = _construct(arch, num_classes)
    except NotImplementedError:
        if not meta:
            raise
        # Some builders compute widths with tensor arithmetic that the meta device cannot read back
        # (torchvision's RegNets): build on the CPU, then drop the storage.
        with torch.device("cpu"):
            net = _construct(arch, num_classes).to("meta")
    except TypeError as e:  # a builder without num_classes
        raise BadValue("arch", f"{arch}: cannot be built with num_classes ({e})") from None
    return net


@functools.lru_cache(maxsize=64)
def head_paths(arch: str) -> tuple[str, ...]:
    """Module paths of `arch`'s classifier head(s): the layers whose shapes follow `num_classes`."""
    with torch.device("meta"):
        a, b = build_source(arch, 3).state_dict(), build_source(arch, 5).state_dict()
    heads = tuple(dict.fromkeys(k.rpartition(".")[0] for k in a if k in b and a[k].shape != b[k].shape))
    if not heads:
        raise BadValue("arch", f"{arch}: no layer follows num_classes, so its classifier head cannot be found")
    return heads
