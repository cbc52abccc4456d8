"""Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation basic blocks, 1x1 conv shortcuts.

WRN-d-k has (d-4)/6 blocks per stage and stage widths 16k/32k/64k. Each block's conv1 is the
prunable unit ("layer2.1"); BN2 and conv2's inputs are cut with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kesi_dist.models.base import PrunableNet, Unit, check_widths, init_weights

__all__ = ["WideBasic", "WideResNet"]


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3 (+ shortcut). The shortcut reads the pre-activated input."""

    def __init__(self, in_planes: int, mid: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return out + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(PrunableNet):
    def __init__(self, arch: str, depth: int, k: int, num_classes: int = 10, widths: list | None = None):
        assert (depth - 4) % 6 == 0, "WRN depth is 6n+4"
        n = (depth - 4) // 6
        planes = [16 * k, 32 * k, 64 * k]
        widths = check_widths(arch, widths, [p for p in planes for _ in range(n)])
        super().__init__(arch, widths, num_classes)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self._units: list[Unit] = []
        in_planes, i = 16, 0
        for s, p in enumerate(planes):
            layer = []
            for b in range(n):
                layer.append(WideBasic(in_planes, widths[i], p, 2 if s > 0 and b == 0 else 1))
                name = f"layer{s + 1}.{b}"
                self._units.append(Unit(name, s, f"{name}.conv1", (f"{name}.bn2",), (f"{name}.conv2",)))
                in_planes, i = p, i + 1
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
