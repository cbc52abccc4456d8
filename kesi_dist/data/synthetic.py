"""A class-conditional image generator for scale tests, deterministic by seed.

Each class is a prototype: a sum of a few coloured 2-D sinusoids (random frequency, orientation,
phase and colour per class). A sample of class c is its prototype, shifted, blended with another
class's prototype, scaled in contrast and covered with Gaussian noise. `difficulty` in [0, 1]
sets how strong those nuisances are: at 0 a nearest-centroid classifier on raw pixels is
essentially perfect, at 1 classes overlap heavily. Any number of images, classes and any
resolution; images are rendered on access (sample i of a split depends only on seed, split, i),
so a Tiny-ImageNet-shaped set costs no memory up front.
"""

from __future__ import annotations

import numpy as np

from kesi_dist.errors import UsageError

__all__ = ["SyntheticSplit", "make_synthetic", "GENERATOR_VERSION"]

GENERATOR_VERSION = 1
_COMPONENTS = 4


def _class_params(num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    freq = rng.uniform(1.0, 4.0, size=(num_classes, _COMPONENTS)) * rng.choice([-1.0, 1.0], size=(num_classes, _COMPONENTS))
    angle = rng.uniform(0, np.pi, size=(num_classes, _COMPONENTS))
    fvec = np.stack([freq * np.cos(angle), freq * np.sin(angle)], axis=-1)  # (C, K, 2) cycles per image
    phase = rng.uniform(0, 2 * np.pi, size=(num_classes, _COMPONENTS))
    colour = rng.normal(size=(num_classes, _COMPONENTS, 3))
    return fvec, phase, colour


class SyntheticSplit:
    """One split of the synthetic dataset (`split_id` 0 = train, 1 = val)."""

    def __init__(self, n: int, num_classes: int, resolution: int, difficulty: float, seed: int, split_id: int):
        self.n, self.num_classes, self.resolution = int(n), int(num_classes), int(resolution)
        self.difficulty, self.seed, self.split_id = float(difficulty), int(seed), int(split_id)
        order_rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, 0]))
        self.labels = order_rng.permutation(np.arange(self.n) % self.num_classes).astype(np.int64)
        self.fvec, self.phase, self.colour = _class_params(self.num_classes, self.seed)
        r = self.resolution
        self._grid = np.stack(np.meshgrid(np.arange(r), np.arange(r), indexing="ij"), axis=-1) / r  # (R, R, 2): y, x

    def __len__(self) -> int:
        return self.n

    def _pattern(self, c: int, shift: np.ndarray) -> np.ndarray:
        # theta (R, R, K) = 2 pi (f . (p - shift)) + phase
        f = self.fvec[c]
        theta = 2 * np.pi * (self._grid - shift) @ f[:, ::-1].T + self.phase[c]
        return np.sin(theta) @ self.colour[c] / np.sqrt(_COMPONENTS / 2)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        d = self.difficulty
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.split_id, 1, int(i)]))
        c = int(self.labels[i])
        shift = rng.uniform(-0.25, 0.25, size=2) * d
        x = self._pattern(c, shift)
        if self.num_classes > 1 and d > 0:
            other = (c + 1 + int(rng.integers(self.num_classes - 1))) % self.num_classes
            m = 0.6 * d * rng.uniform()
            x = (1 - m) * x + m * self._pattern(other, shift)
        x = x * rng.uniform(1.0 - 0.4 * d, 1.0) + rng.normal(scale=0.15 + 0.85 * d, size=x.shape)
        img = np.clip(128.0 + 48.0 * x, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(img), c, int(i)


def make_synthetic(num_train: int = 2000, num_val: int = 500, num_classes: int = 10, difficulty: float = 0.5,
                   resolution: int = 32, seed: int = 0):
    """SourceData of the synthetic generator; UsageError names a bad option."""
    from kesi_dist.data.splits import SourceData

    for name, value, lo in (("num_train", num_train, 1), ("num_val", num_val, 1), ("num_classes", num_classes, 2)):
        if int(value) != value or value < lo:
            raise UsageError(f"synthetic {name}={value!r}: must be an integer >= {lo}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise UsageError(f"synthetic difficulty={difficulty!r}: must be in [0, 1] (0 easy .. 1 hard)")
    identity = {"generator": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
                "num_classes": int(num_classes), "difficulty": float(difficulty), "seed": int(seed)}
    return SourceData(
        "synthetic",
        SyntheticSplit(num_train, num_classes, resolution, difficulty, seed, 0),
        SyntheticSplit(num_val, num_classes, resolution, difficulty, seed, 1),
        [f"class_{k}" for k in range(num_classes)],
        resolution,
        identity,
    )
