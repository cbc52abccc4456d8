"""Pre-activation ResNet with bottlenecks (He et al. 2016, "Identity mappings"), CIFAR layout.

Each bottleneck is BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 (x4 expansion); a 1x1 conv is
the shortcut where the shape changes. conv1 and conv2 of every block are separate prunable units
("layer1.17.conv1", "layer1.17.conv2"); conv3 and the residual stream keep their widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kesi_dist.models.base import PrunableNet, Unit, check_widths, init_weights

__all__ = ["Bottleneck", "PreResNet"]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, mid1: int, mid2: int, planes: int, stride: int):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, mid1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid1)
        self.conv2 = nn.Conv2d(mid1, mid2, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid2)
        self.conv3 = nn.Conv2d(mid2, out_planes, 1, bias=False)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class PreResNet(PrunableNet):
    """PreResNet-(9n+2): 3x3 stem, three stages of n bottlenecks (16/32/64 x4), final BN-ReLU, pool, fc."""

    def __init__(self, arch: str, depth: int, num_classes: int = 10, widths: list | None = None):
        assert (depth - 2) % 9 == 0, "PreResNet bottleneck depth is 9n+2"
        n = (depth - 2) // 9
        planes = [16, 32, 64]
        widths = check_widths(arch, widths, [p for p in planes for _ in range(2 * n)])
        super().__init__(arch, widths, num_classes)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self._units: list[Unit] = []
        in_planes, i = 16, 0
        for s, p in enumerate(planes):
            layer = []
            for b in range(n):
                layer.append(Bottleneck(in_planes, widths[i], widths[i + 1], p, 2 if s > 0 and b == 0 else 1))
                name = f"layer{s + 1}.{b}"
                self._units += [
                    Unit(f"{name}.conv1", s, f"{name}.conv1", (f"{name}.bn2",), (f"{name}.conv2",)),
                    Unit(f"{name}.conv2", s, f"{name}.conv2", (f"{name}.bn3",), (f"{name}.conv3",)),
                ]
                in_planes, i = p * Bottleneck.expansion, i + 2
            self.add_module(f"layer{s + 1}", nn.Sequential(*layer))
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    num_stages, stem_modules, head_modules = 3, ("conv1",), ("bn", "fc")

    def units(self) -> list[Unit]:
        return list(self._units)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1), 1))
