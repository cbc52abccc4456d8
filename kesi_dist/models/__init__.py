"""The pruneable model zoo: every network is rebuilt exactly from `(arch, widths, num_classes)`.

    model = build_model("resnet56")                      # unpruned, CIFAR-10
    small = build_model("resnet56", 10, model.widths)    # same architecture from its widths

Each model exposes `.arch`, `.widths`, `.num_classes` and `.units()` (the prunable units by name).

Beside the zoo's names, "torchvision:<name>" and "timm:<name>" build that library's network with random
weights as a `GraphNet` (`kesi_dist.models.graphnet`): its units come from Torch-Pruning's dependency graph,
traced at `resolution` px, and it rebuilds from its widths like a zoo model.

    model = build_model("torchvision:resnet50", 10, resolution=224)
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from kesi_dist.errors import UsageError
from kesi_dist.models.base import MODELS, PrunableNet, Unit, check_widths, register
from kesi_dist.models.graphnet import GraphNet
from kesi_dist.models.preresnet import PreResNet
from kesi_dist.models.resnet import CifarResNet, ImageNetResNet
from kesi_dist.models.sources import is_source_arch, source_problem
from kesi_dist.models.vgg import VGG, VGG16_CFG
from kesi_dist.models.wrn import WideResNet

__all__ = ["MODELS", "PrunableNet", "Unit", "GraphNet", "build_model", "model_options", "default_widths", "model_units",
           "is_source_arch", "known_arch"]


@register
def resnet20(num_classes: int = 10, widths: list | None = None, shortcut: str = "avgpool") -> PrunableNet:
    return CifarResNet("resnet20", 20, num_classes, widths, shortcut)


@register
def resnet32(num_classes: int = 10, widths: list | None = None, shortcut: str = "avgpool") -> PrunableNet:
    return CifarResNet("resnet32", 32, num_classes, widths, shortcut)


@register
def resnet56(num_classes: int = 10, widths: list | None = None, shortcut: str = "avgpool") -> PrunableNet:
    return CifarResNet("resnet56", 56, num_classes, widths, shortcut)


@register
def resnet110(num_classes: int = 10, widths: list | None = None, shortcut: str = "avgpool") -> PrunableNet:
    return CifarResNet("resnet110", 110, num_classes, widths, shortcut)


@register
def preresnet164(num_classes: int = 10, widths: list | None = None) -> PrunableNet:
    return PreResNet("preresnet164", 164, num_classes, widths)


@register
def wrn16_8(num_classes: int = 10, widths: list | None = None) -> PrunableNet:
    return WideResNet("wrn16_8", 16, 8, num_classes, widths)


@register
def vgg16(num_classes: int = 10, widths: list | None = None) -> PrunableNet:
    return VGG("vgg16", VGG16_CFG, num_classes, widths)


@register
def resnet18(num_classes: int = 10, widths: list | None = None) -> PrunableNet:
    return ImageNetResNet("resnet18", [2, 2, 2, 2], num_classes, widths)


@register
def resnet34(num_classes: int = 10, widths: list | None = None) -> PrunableNet:
    return ImageNetResNet("resnet34", [3, 4, 6, 3], num_classes, widths)


def known_arch(arch: str) -> str | None:
    """Why `arch` names no network (a zoo name, torchvision:<name> or timm:<name>), or None when it does."""
    if isinstance(arch, str) and arch in MODELS:
        return None
    if isinstance(arch, str) and ":" in arch:
        return source_problem(arch)
    return f"unknown model {arch!r}; choose one of {', '.join(sorted(MODELS))}, or torchvision:<name> / timm:<name>"


def model_options(arch: str) -> tuple[str, ...]:
    """The architecture options `arch`'s builder takes (`build_model(..., **options)`), e.g. ("shortcut",)."""
    builder = GraphNet if is_source_arch(arch) else MODELS[arch]
    return tuple(p for p in inspect.signature(builder).parameters
                 if p not in ("num_classes", "widths", "arch"))


def build_model(arch: str, num_classes: int = 10, widths: list | None = None, **options) -> nn.Module:
    """Build `arch` with `num_classes` outputs; `widths=None` gives the unpruned network. `options` are
    the architecture's own choices (`model_options`; CIFAR ResNets: shortcut="avgpool" | "slice";
    torchvision/timm networks: resolution=<traced input side>, default 224).

    Raises:
        UsageError: unknown `arch` or option, `widths` of the wrong length / with non-positive entries, or a
            torchvision/timm network the dependency graph cannot cut (naming the layer).
    """
    problem = known_arch(arch)
    if problem:
        raise UsageError(problem)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UsageError(f"{arch}: num_classes must be a positive int, got {num_classes!r}")
    unknown = sorted(set(options) - set(model_options(arch)))
    if unknown:
        raise UsageError(f"{arch}: has no option {unknown[0]!r} (its options: {', '.join(model_options(arch)) or 'none'})")
    if is_source_arch(arch):
        return GraphNet(arch, num_classes, widths, **options)
    return MODELS[arch](num_classes=num_classes, widths=widths, **options)


def _skeleton(arch: str, widths: list | None = None) -> PrunableNet:
    # On the meta device no memory is allocated and no init runs: structure only, ~milliseconds.
    with torch.device("meta"):
        return build_model(arch, 10, widths)


@functools.lru_cache(maxsize=16)
def _source_units(arch: str) -> tuple[tuple[Unit, ...], tuple[int, ...]]:
    # A traced network's units do not depend on its widths, its classes or its resolution (stages are
    # ranked at a fixed 128 px): trace it once per process.
    skeleton = _skeleton(arch)
    return tuple(skeleton.units()), tuple(skeleton.widths)


def default_widths(arch: str) -> list:
    """The unpruned widths of `arch` (one int per prunable unit, JSON-serializable)."""
    if is_source_arch(arch):
        return list(_source_units(arch)[1])
    return list(_skeleton(arch).widths)


def model_units(arch: str, widths: list | None = None) -> list[Unit]:
    """The prunable units of `arch` (names, stages, layers), without allocating weights."""
    if is_source_arch(arch):
        units, full = _source_units(arch)
        check_widths(arch, widths, list(full))
        return list(units)
    return _skeleton(arch, widths).units()
