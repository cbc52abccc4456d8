"""The torch backend of `make_loader`: `TorchLoader`, a plain `torch.utils.data.DataLoader`.

Worker processes read the *same* `.beton` files through `kesi_dist.data.beton.BetonFile` and apply
the plan in numpy (`apply_plan`): same shards, same augmentation parameters (both backends call
`kesi_dist.data.augment`) and the same resize code as the FFCV backend, so pixels agree exactly. It
is the fallback where FFCV's numba pipeline cannot run, and the reference for parity tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kesi_dist.data.augment import (
    CENTER_CROP_RATIO,
    RRC_RATIO,
    RRC_SCALE,
    center_crop_box,
    flip_decision,
    random_resized_crop_box,
    translate_offsets,
)
from kesi_dist.data.image_loader import AugmentPlan, ImageLoader
from kesi_dist.errors import RunError

__all__ = ["TorchLoader", "apply_plan"]


def apply_plan(image: np.ndarray, plan: AugmentPlan, seed: int, epoch: int, index: int) -> np.ndarray:
    """The FFCV pipeline of `plan` for one uint8 HWC image, in numpy (the torch backend's transform)."""
    from kesi_dist.data.beton import resize_box

    h, w = image.shape[:2]
    if plan.decode == "random":
        box = random_resized_crop_box(seed, epoch, index, h, w, RRC_SCALE[0], RRC_SCALE[1], RRC_RATIO[0], RRC_RATIO[1])
        image = resize_box(image, *box, plan.size)
    elif plan.decode != "stored":
        ratio = CENTER_CROP_RATIO if plan.decode == "center" else 1.0
        image = resize_box(image, *center_crop_box(h, w, ratio), plan.size)
    if plan.pad:
        dy, dx = translate_offsets(seed, epoch, index, plan.pad)
        padded = np.pad(image, ((plan.pad, plan.pad), (plan.pad, plan.pad), (0, 0)))
        image = padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]
    if plan.flip and flip_decision(seed, epoch, index):
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


class _BetonDataset(torch.utils.data.Dataset):
    def __init__(self, path: Path, plan: AugmentPlan, seed: int):
        from kesi_dist.data.beton import BetonFile

        self.file, self.plan, self.seed = BetonFile(path), plan, seed

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, item):
        i, epoch = item  # the sampler sends (sample, epoch) so workers need no epoch state
        img = apply_plan(self.file.image(i), self.plan, self.seed, epoch, i)
        return img, int(self.file.labels[i]), int(self.file.indices[i])


def _collate(samples):
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    indices = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return images, labels, indices


class _EpochBatches(torch.utils.data.Sampler):
    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        ld = self.loader
        order, bs, epoch = ld.order(ld.epoch), ld.batch_size, ld.epoch
        for b in range(len(ld)):
            yield [(int(i), epoch) for i in order[b * bs:(b + 1) * bs]]


class TorchLoader(ImageLoader):
    def __init__(self, *args, num_workers: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset = _BetonDataset(self.data_dir / f"{self.split}.beton", self.plan, self.seed)
        if len(self.dataset) != self.split_size:
            raise RunError(f"{self.data_dir / (self.split + '.beton')}: holds {len(self.dataset)} samples but "
                           f"meta.json says {self.split_size}; re-run `kesi data prepare`")
        self._dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_EpochBatches(self), num_workers=num_workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda" and torch.cuda.is_available(),
        )

    def __iter__(self):
        self._start_epoch()
        for images, labels, indices in self._dl:
            yield self._finish(images, labels, indices)
