"""The backend-independent part of a loader: the per-sample pixel plan and the `ImageLoader` base.

`augment_plan` turns (augment, split, stored side, resolution) into an `AugmentPlan` that both backends execute
identically (`kesi_dist.data.ffcv_loader`, `kesi_dist.data.torch_loader`). `ImageLoader` does the
sharding, the epoch bookkeeping (`set_epoch`, `set_window`) and the final normalisation to float32
NCHW on the target device. Build loaders with `kesi_dist.data.loaders.make_loader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kesi_dist.data.augment import epoch_order

__all__ = ["ImageLoader", "AugmentPlan", "augment_plan", "CIFAR_PAD"]

CIFAR_PAD = 4


@dataclass(frozen=True)
class AugmentPlan:
    """Per-sample pixel pipeline: decode ("stored" | "full" | "center" | "random") to `size`, then
    optional pad-and-crop (`pad` > 0) and flip."""

    decode: str
    size: int
    pad: int
    flip: bool


def augment_plan(augment: str, train: bool, stored: int, resolution: int) -> AugmentPlan:
    if augment == "imagenet":
        return AugmentPlan("random", resolution, 0, True) if train else AugmentPlan("center", resolution, 0, False)
    decode = "stored" if resolution == stored else "full"
    if augment == "cifar" and train:
        return AugmentPlan(decode, resolution, CIFAR_PAD, True)
    return AugmentPlan(decode, resolution, 0, False)


class ImageLoader:
    """Common part of both backends: sharding, epochs, normalisation. Iterate to get
    `(images float32 NCHW on device, labels int64 [B])`, plus `indices int64 [B]` (position in the
    split) when built with `return_indices=True`."""

    def __init__(self, data_dir: Path, split: str, meta: dict, *, batch_size: int, plan: AugmentPlan, seed: int,
                 rank: int, world_size: int, shuffle: bool, drop_last: bool, device: torch.device,
                 channels_last: bool, return_indices: bool, subset: np.ndarray | None = None):
        self.data_dir, self.split, self.meta, self.plan = data_dir, split, meta, plan
        self.subset = subset  # positions in the split this loader serves (None: all; see data.holdout)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last, self.device = shuffle, drop_last, device
        self.channels_last, self.return_indices = channels_last, return_indices
        self.split_size = int(meta[f"{split}_size"])
        self.window: tuple[int, int] | None = None
        self.num_samples = len(self.order(0))  # this rank's samples per epoch
        self.resolution = plan.size
        self.num_classes = int(meta["num_classes"])
        self._next_epoch = 0
        self.epoch = 0
        self._mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1).to(device)
        self._std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1).to(device)

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices (positions in the split) this rank visits in `epoch`, in order."""
        n = self.split_size if self.subset is None else len(self.subset)
        order = epoch_order(n, seed=self.seed, epoch=epoch, shuffle=self.shuffle, rank=self.rank,
                            world_size=self.world_size, drop_last=self.drop_last)
        if self.subset is not None:
            order = self.subset[order]
        return order if self.window is None else order[self.window[0]:self.window[1]]

    def set_window(self, start: int | None, stop: int | None = None) -> None:
        """Visit only positions `start:stop` of each epoch's order (None: all of it).

        Lets several processes split one epoch's work without each reading the whole epoch: with
        both ends multiples of batch_size, the batches are exactly those of the full epoch.
        """
        self.window = None if start is None else (int(start), int(self.num_samples if stop is None else stop))

    def set_epoch(self, epoch: int) -> None:
        """The next iteration replays epoch `epoch` (order and augmentation)."""
        self._next_epoch = int(epoch)

    def __len__(self) -> int:
        n = self.num_samples if self.window is None else len(range(self.num_samples)[slice(*self.window)])
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _start_epoch(self) -> int:
        self.epoch = self._next_epoch
        self._next_epoch += 1
        return self.epoch

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None, nhwc: bool = True):
        """uint8 NHWC (or NCHW, already on the GPU) -> normalised float32 NCHW on `device`.

        Float input is already normalised (FFCV's CPU path); it is copied out of FFCV's reused buffers.
        """
        if nhwc:
            images = images.permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if images.dtype == torch.float32:
            images = images.clone(memory_format=fmt)
        else:
            images = images.to(self.device, non_blocking=True).float()
            images = (images - self._mean) / self._std
            images = images.contiguous(memory_format=fmt)
        # FFCV hands out views of buffers it reuses a few batches later: labels/indices get their own memory.
        labels = labels.to(self.device, dtype=torch.int64, non_blocking=True, copy=True).view(-1)
        if self.return_indices:
            return images, labels, indices.to(self.device, dtype=torch.int64, non_blocking=True, copy=True).view(-1)
        return images, labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.data_dir}/{self.split}, batches={len(self)}, batch_size={self.batch_size}, "
                f"rank={self.rank}/{self.world_size}, resolution={self.resolution}, plan={self.plan})")
