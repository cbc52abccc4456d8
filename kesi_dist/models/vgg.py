"""VGG-16 with BatchNorm for CIFAR (the cfg used by PFEC and "Rethinking the value of pruning").

Every conv is a prunable unit named like the paper ("conv1_1" .. "conv5_3"); its stage is the block
between max-pools (0..4). The classifier is Linear(512, 512)-BN1d-ReLU-Linear(512, classes).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from kesi_dist.models.base import PrunableNet, Unit, check_widths, init_weights

__all__ = ["VGG", "VGG16_CFG"]

# Convs per block and their widths; a 2x2 max-pool follows blocks 1-4 (none after block 5).
VGG16_CFG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, 1, 1, bias=False), bn=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True)
        ))


class VGG(PrunableNet):
    def __init__(self, arch: str, cfg: list[list[int]], num_classes: int = 10, widths: list | None = None):
        widths = check_widths(arch, widths, [w for block in cfg for w in block])
        super().__init__(arch, widths, num_classes)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        names = [(s, f"conv{s + 1}_{j + 1}") for s, block in enumerate(cfg) for j in range(len(block))]
        cin = 3
        for (s, name), w in zip(names, widths):
            layers[name] = ConvBNReLU(cin, w)
            cin = w
            if name.endswith(f"_{len(cfg[s])}") and s < len(cfg) - 1:
                layers[f"pool{s + 1}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )
        consumers = [f"features.{n}.conv" for _, n in names[1:]] + ["classifier.0"]
        self._units = [
            Unit(n, s, f"features.{n}.conv", (f"features.{n}.bn",), (c,)) for (s, n), c in zip(names, consumers)
        ]
        init_weights(self)

    def units(self) -> list[Unit]:
        return list(self._units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
