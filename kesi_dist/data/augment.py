"""Counter-based randomness shared by the FFCV and the torch loaders.

Every random decision (crop offsets, flips, resized-crop boxes, the epoch permutation) is a pure
function of `(seed, epoch, sample index)`. That makes an epoch replayable (a resumed run sees the
same batches and the same augmentations), independent of thread scheduling inside FFCV's numba
pipeline, and identical between the two loader backends, which both call these functions.

The helpers are numba-jitted so FFCV's compiled pipeline can call them; they are ordinary callables
from Python as well.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "uniform",
    "translate_offsets",
    "flip_decision",
    "random_resized_crop_box",
    "center_crop_box",
    "epoch_order",
    "RRC_SCALE",
    "RRC_RATIO",
    "CENTER_CROP_RATIO",
    "views",
]

RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CENTER_CROP_RATIO = 0.875  # val: resize to resolution / 0.875, center crop resolution

# Stream ids: which random number of a sample a decision consumes (views: 64 + 4 x view + 0/1/2).
_K_DY, _K_DX, _K_FLIP, _K_RRC, _K_VIEWS = 0, 1, 2, 16, 64

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@njit(nogil=True, cache=True)
def _mix64(z):
    # splitmix64 finaliser; all operands uint64 so arithmetic wraps instead of promoting to float.
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(nogil=True, cache=True)
def uniform(seed, epoch, index, k):
    """A float in [0, 1) determined by (seed, epoch, sample index, stream k)."""
    h = _mix64(np.uint64(seed) * _GOLDEN + np.uint64(epoch))
    h = _mix64(h ^ (np.uint64(index) * _M1 + _GOLDEN))
    h = _mix64(h ^ (np.uint64(k) * _M2 + _GOLDEN))
    return float(h >> _S11) * (1.0 / 9007199254740992.0)


@njit(nogil=True, cache=True)
def translate_offsets(seed, epoch, index, pad):
    """Offsets (dy, dx) in [0, 2*pad] of a pad-and-random-crop (torchvision RandomCrop(padding=pad))."""
    n = 2 * pad + 1
    dy = min(int(uniform(seed, epoch, index, _K_DY) * n), n - 1)
    dx = min(int(uniform(seed, epoch, index, _K_DX) * n), n - 1)
    return dy, dx


@njit(nogil=True, cache=True)
def flip_decision(seed, epoch, index):
    """True when the sample is flipped horizontally (probability 0.5)."""
    return uniform(seed, epoch, index, _K_FLIP) < 0.5


@njit(nogil=True, cache=True)
def random_resized_crop_box(seed, epoch, index, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi):
    """Box (top, left, h, w) drawn like torchvision's RandomResizedCrop.get_params."""
    area = height * width
    log_lo = math.log(ratio_lo)
    log_hi = math.log(ratio_hi)
    for attempt in range(10):
        k = _K_RRC + 4 * attempt
        target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(seed, epoch, index, k))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(seed, epoch, index, k + 1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(uniform(seed, epoch, index, k + 2) * (height - h + 1)), height - h)
            left = min(int(uniform(seed, epoch, index, k + 3) * (width - w + 1)), width - w)
            return top, left, h, w
    # Fallback: central crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w = width
        h = int(round(w / ratio_lo))
    elif in_ratio > ratio_hi:
        h = height
        w = int(round(h * ratio_hi))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(nogil=True, cache=True)
def center_crop_box(height, width, ratio):
    """Central square box of side ratio * min(height, width): (top, left, h, w)."""
    c = int(ratio * min(height, width))
    return (height - c) // 2, (width - c) // 2, c, c


def epoch_order(
    n: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1, drop_last: bool = False
) -> np.ndarray:
    """Sample indices one rank visits in one epoch.

    The permutation depends only on (seed, epoch); rank r takes every `world_size`-th element from
    offset r, so shards are disjoint and, without `drop_last`, their union is the whole split. With
    `drop_last` the permutation is first cut to a multiple of `world_size` (at most world_size - 1
    samples skipped, different ones every epoch) so every rank gets the same count, which DDP needs.
    """
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)
    else:
        order = np.arange(n)
    if drop_last:
        order = order[: (n // world_size) * world_size]
    return order[rank::world_size].astype(np.int64)


def views(images, indices, *, seed: int, epoch: int, count: int, pad: int):
    """`count` augmented views of every image of a batch (EKG's fine-tuning), made from clean images on
    their device: reflect-pad `pad`, random crop back to size, horizontal flip. Every decision is a
    function of (seed, epoch, sample index, view), like the loaders' own augmentation.

    Args:
        images: float [B, C, H, W] (normalised); indices: int [B], positions in the split.

    Returns:
        [B * count, C, H, W], the views of sample b at rows b * count .. b * count + count - 1.
    """
    import torch
    import torch.nn.functional as F

    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect") if pad else images
    out = []
    n = 2 * pad + 1
    for i, index in enumerate(indices.tolist()):
        for v in range(count):
            k = _K_VIEWS + 4 * v
            dy = min(int(uniform(seed, epoch, index, k) * n), n - 1)
            dx = min(int(uniform(seed, epoch, index, k + 1) * n), n - 1)
            crop = padded[i, :, dy:dy + h, dx:dx + w]
            out.append(torch.flip(crop, dims=(2,)) if uniform(seed, epoch, index, k + 2) < 0.5 else crop)
    return torch.stack(out)
