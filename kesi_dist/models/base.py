"""What every zoo model shares: the registry, prunable units and the widths contract.

A model is fully described by `(arch, widths, num_classes)`. `widths` holds one int per prunable
unit (in `units()` order): the number of filters of the conv that unit prunes. Block outputs of
residual nets are not units, so they keep their original width whatever the pruning history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from kesi_dist.errors import UsageError

__all__ = ["MODELS", "PrunableNet", "Unit", "register", "init_weights", "check_widths"]

MODELS: dict[str, Callable[..., "PrunableNet"]] = {}


def register(fn: Callable[..., "PrunableNet"]) -> Callable[..., "PrunableNet"]:
    """Add a builder `fn(num_classes=10, widths=None)` to `MODELS` under its function name."""
    MODELS[fn.__name__] = fn
    return fn


@dataclass(frozen=True)
class Unit:
    """One prunable group of filters and the layers that must be cut with it.

    Attributes:
        name: user-facing name, matched by `skip` / `layer_ratios` ("layer1.7", "conv1_1").
        stage: 0-based stage index (ResNet layer1 -> 0; VGG: block between max-pools).
        conv: module path of the conv whose output filters are pruned.
        norms: BatchNorm modules over those channels (sliced along their only dim).
        consumers: conv/linear modules that read those channels (input dim 1 sliced).
        kind: "inner" (a block's internal width: every zoo unit), "stream" (channels summed by residual
            additions) or "depthwise" (an expansion with the depthwise conv that carries its channels);
            see `kesi_dist.models.graph`.
        producers: other conv/linear modules whose output channels are these (a stream's other convs,
            a depthwise conv: its filters go with its input channels).
        consumer_fan: per consumer, the input channels it reads per unit channel (a flatten before a
            linear layer reads H x W per channel); empty = 1 each.
    """

    name: str
    stage: int
    conv: str
    norms: tuple[str, ...]
    consumers: tuple[str, ...]
    kind: str = "inner"
    producers: tuple[str, ...] = ()
    consumer_fan: tuple[int, ...] = ()


class PrunableNet(nn.Module):
    """Base class: sets `.arch`, `.widths`, `.num_classes`; subclasses implement `units()`."""

    def __init__(self, arch: str, widths: list[int], num_classes: int):
        super().__init__()
        self.arch = arch
        self.widths = [int(w) for w in widths]
        self.num_classes = int(num_classes)

    def units(self) -> list[Unit]:
        raise NotImplementedError

    @property
    def options(self) -> dict:
        """Architecture choices beyond (arch, widths, num_classes) that `build_model` takes back (e.g. a
        CIFAR ResNet's shortcut); saved with every checkpoint."""
        return {}

    # -- stages (residual nets: SWP's stage-wise supernets) ------------------------------------------
    # A net whose stage outputs keep a fixed width (the residual stream) splits into stages that can be
    # run and trained apart: stage 0 = stem + layer1, stage s = layer{s+1}, the last one also the head.
    # Subclasses that can set `num_stages` and implement `stem` and `head` (module names in
    # `stem_modules` / `head_modules`); 0 stages = not stage-wise (VGG: a stage's output is a unit).
    num_stages: int = 0
    stem_modules: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ()

    def stem(self, x):
        raise NotImplementedError

    def head(self, x):
        raise NotImplementedError

    def forward(self, x):
        for s in range(self.num_stages):
            x = self.forward_stage(x, s)
        return x

    def forward_stage(self, x, s: int):
        """Stage `s` alone: its input is the previous stage's output (the image for stage 0), its output
        the next stage's input (the logits for the last one)."""
        if not 0 <= s < self.num_stages:
            raise ValueError(f"{self.arch}: no stage {s} (it has {self.num_stages})")
        if s == 0:
            x = self.stem(x)
        x = getattr(self, f"layer{s + 1}")(x)
        return self.head(x) if s == self.num_stages - 1 else x

    def stage_of(self, key: str) -> int:
        """The stage a parameter or buffer (state-dict key) belongs to."""
        first = key.split(".", 1)[0]
        if first.startswith("layer") and first[5:].isdigit():
            return int(first[5:]) - 1
        if first in self.stem_modules:
            return 0
        if first in self.head_modules:
            return self.num_stages - 1
        raise ValueError(f"{self.arch}: {key} belongs to no stage")


def check_widths(arch: str, widths: list | None, default: list[int]) -> list[int]:
    """Return `widths` (or `default`) after checking it has one positive int per unit."""
    if widths is None:
        return list(default)
    ok = isinstance(widths, (list, tuple)) and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths
    )
    if not ok or len(widths) != len(default):
        raise UsageError(
            f"{arch}: widths must be a list of {len(default)} positive ints (one per prunable unit), "
            f"got {widths!r}"[:300]
        )
    return [int(w) for w in widths]


def init_weights(model: nn.Module) -> None:
    """He init for convs (fan-out, as torchvision's ResNet), BN to identity, small normal for linears."""
    if any(p.is_meta for p in model.parameters()):
        return  # a structure-only skeleton: nothing to initialise
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
