"""Post-activation ResNets with basic blocks: CIFAR (He et al. 2016, option-A shortcut) and ImageNet-style.

Each block's inner width (conv1's filters) is one prunable unit named like the block ("layer2.0");
the block's output width is fixed per stage so the residual additions always line up.

CIFAR ResNets downsample the shortcut without parameters, in one of two ways (`shortcut`):
"avgpool" (the reference code's, lehduong/kesi after rethinking-network-pruning: 2x2 average pooling,
then zero channels) or "slice" (every other pixel, then zero channels, as in many re-implementations
and in kesi_dist before the option existed; checkpoints without the option are of this kind).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kesi_dist.errors import UsageError
from kesi_dist.models.base import PrunableNet, Unit, check_widths, init_weights

__all__ = ["BasicBlock", "CifarResNet", "ImageNetResNet", "SHORTCUTS"]


SHORTCUTS = ("avgpool", "slice")


class ZeroPadShortcut(nn.Module):
    """Option A: downsample by `stride` (average pooling or slicing) and zero-pad the new channels; no
    parameters."""

    def __init__(self, stride: int, extra_channels: int, mode: str = "avgpool"):
        super().__init__()
        self.stride, self.extra_channels, self.mode = stride, extra_channels, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avgpool":
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        else:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut), ReLU. `mid` is the prunable inner width.

    `shortcut` is "A" (zero padding, CIFAR; `pad_mode` says how it downsamples) or "B" (1x1 conv + BN,
    ImageNet) when the shape changes.
    """

    def __init__(self, in_planes: int, mid: int, out_planes: int, stride: int, shortcut: str,
                 pad_mode: str = "avgpool"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(stride, out_planes - in_planes, pad_mode)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_stages(
    model: nn.Module, in_planes: int, stage_planes: list[int], blocks: int | list[int], mids: list[int],
    shortcut: str, first_stride: int, pad_mode: str = "avgpool",
) -> list[Unit]:
    """Attach `layer1..layerN` of basic blocks to `model`; return their units in order."""
    counts = [blocks] * len(stage_planes) if isinstance(blocks, int) else blocks
    units, i = [], 0
    for s, (planes, n) in enumerate(zip(stage_planes, counts)):
        layer = []
        for b in range(n):
            stride = (first_stride if s == 0 else 2) if b == 0 else 1
            layer.append(BasicBlock(in_planes, mids[i], planes, stride, shortcut, pad_mode))
            name = f"layer{s + 1}.{b}"
            units.append(Unit(name, s, f"{name}.conv1", (f"{name}.bn1",), (f"{name}.conv2",)))
            in_planes, i = planes, i + 1
        model.add_module(f"layer{s + 1}", nn.Sequential(*layer))
    return units


class CifarResNet(PrunableNet):
    """ResNet-(6n+2) for 32x32 inputs: 3x3 stem, three stages of n blocks (16/32/64), avg-pool, fc."""

    def __init__(self, arch: str, depth: int, num_classes: int = 10, widths: list | None = None,
                 shortcut: str = "avgpool"):
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth is 6n+2"
        if shortcut not in SHORTCUTS:
            raise UsageError(f"{arch}: shortcut {shortcut!r}: choose one of {', '.join(SHORTCUTS)}")
        n = (depth - 2) // 6
        planes = [16, 32, 64]
        widths = check_widths(arch, widths, [p for p in planes for _ in range(n)])
        super().__init__(arch, widths, num_classes)
        self.shortcut = shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self._units = make_stages(self, 16, planes, n, widths, shortcut="A", first_stride=1, pad_mode=shortcut)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    num_stages, stem_modules, head_modules = 3, ("conv1", "bn1"), ("fc",)

    def units(self) -> list[Unit]:
        return list(self._units)

    @property
    def options(self) -> dict:
        return {"shortcut": self.shortcut}

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ImageNetResNet(PrunableNet):
    """torchvision-style ResNet-18/34: 7x7/2 stem + max-pool, four stages (64..512), adaptive pool, fc."""

    def __init__(self, arch: str, blocks: list[int], num_classes: int = 1000, widths: list | None = None):
        planes = [64, 128, 256, 512]
        widths = check_widths(arch, widths, [p for p, n in zip(planes, blocks) for _ in range(n)])
        super().__init__(arch, widths, num_classes)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._units = make_stages(self, 64, planes, blocks, widths, shortcut="B", first_stride=1)
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    num_stages, stem_modules, head_modules = 4, ("conv1", "bn1", "maxpool"), ("fc",)

    def units(self) -> list[Unit]:
        return list(self._units)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
