"""Teacher sources for `kesi_dist.train.tasks.Distillation`: where a batch's soft targets come from.

- `OnlineTeachers` runs the frozen teachers on the worker's own batch (its shard of the global batch).
- `CachedSoftLabels` reads the batch's soft labels from a `SoftLabelCache` by (epoch, sample index);
  no teacher runs. Call `set_epoch(e)` with the loader's (the task does).
On the same (epoch, indices) both give the same targets up to top-k truncation
(`kesi_dist.distill.losses.truncation_bound`; exact when the cache keeps every class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kesi_dist.distill.ensemble import ensemble_probs, freeze, load_teachers
from kesi_dist.distill.losses import dense_from_topk
from kesi_dist.distill.soft_label_cache import SoftLabelCache
from kesi_dist.errors import BadValue, RunError

__all__ = ["OnlineTeachers", "CachedSoftLabels"]


class OnlineTeachers:
    """Frozen teachers (eval mode, no grad, never wrapped) run on every batch."""

    needs_indices = False

    def __init__(self, teachers: Sequence[nn.Module], *, temperature: float, num_classes: int | None = None):
        if not teachers:
            raise BadValue("teachers", "no teachers given")
        self.teachers = [freeze(t) for t in teachers]
        self.temperature = float(temperature)
        self.num_classes = int(num_classes if num_classes is not None else self.teachers[0].num_classes)

    @classmethod
    def load(cls, paths: Sequence[str], *, temperature: float, device="cpu") -> "OnlineTeachers":
        return cls(load_teachers(paths, device=device), temperature=temperature)

    def set_epoch(self, epoch: int) -> None:
        pass

    def probs(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return ensemble_probs(self.teachers, images, self.temperature)


class CachedSoftLabels:
    """Soft labels looked up by (epoch, sample indices) in a cache built for this temperature."""

    needs_indices = True

    def __init__(self, cache: SoftLabelCache | str, *, temperature: float, num_classes: int):
        cache = cache if isinstance(cache, SoftLabelCache) else SoftLabelCache(cache)
        if cache.num_classes != num_classes:
            raise RunError(f"{cache.dir}: soft labels have {cache.num_classes} classes, the student {num_classes}")
        if abs(float(cache.meta["temperature"]) - float(temperature)) > 1e-12:
            raise RunError(f"{cache.dir}: soft labels were computed at temperature {cache.meta['temperature']}, "
                           f"distillation uses {temperature}; rebuild the cache")
        self.cache, self.num_classes = cache, int(num_classes)
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def probs(self, images: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            raise RunError("cached distillation needs each batch's sample indices: build the train loader with "
                           "make_loader(..., return_indices=True)")
        if self.epoch is None:
            raise RunError("set_epoch(epoch) was not called: the cached labels depend on the epoch")
        values, classes = self.cache.lookup(self.epoch, indices)
        return dense_from_topk(values, classes, self.num_classes)
