"""KD hooks for `kesi_dist.train.train_epoch(..., kd_loss_fn=hook)`.

The loop calls `hook(images, labels, student_logits)`, or `hook(images, labels, student_logits,
indices)` when the loader yields sample indices (`make_loader(..., return_indices=True)`), and
records the returned dict ("loss", "kd_loss", "task_loss"). Call `hook.set_epoch(e)` together with
`loader.set_epoch(e)` before each epoch: the cached hook needs the epoch to find the batch's labels.

- `OnlineKD` runs the frozen teachers on the worker's own batch (its shard of the global batch).
- `CachedKD` reads the batch's soft labels from a `SoftLabelCache`; no teacher runs.
On the same (epoch, indices) both give the same loss up to top-k truncation
(`kesi_dist.distill.losses.truncation_bound`; exact when the cache keeps every class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kesi_dist.distill.cache import SoftLabelCache
from kesi_dist.distill.ensemble import ensemble_probs, freeze
from kesi_dist.distill.losses import dense_from_topk, kd_loss
from kesi_dist.errors import RunError, UsageError

__all__ = ["OnlineKD", "CachedKD"]


class _KDHook:
    def __init__(self, *, temperature: float, alpha: float, num_classes: int):
        if temperature <= 0:
            raise UsageError(f"distill.temperature {temperature}: must be > 0")
        if not 0 <= alpha <= 1:
            raise UsageError(f"distill.alpha {alpha}: must be in [0, 1]")
        self.temperature, self.alpha, self.num_classes = float(temperature), float(alpha), int(num_classes)
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the loader is about to replay (the cached labels are per epoch)."""
        self.epoch = int(epoch)

    def _check(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise RunError(f"student outputs {tuple(logits.shape)} but the distillation targets have "
                           f"{self.num_classes} classes; student and teachers must share the label set")

    def _loss(self, logits: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return kd_loss(logits, probs.to(logits.device), labels,
                       temperature=self.temperature, alpha=self.alpha)


class OnlineKD(_KDHook):
    """Distil from teachers run on the current batch (under no_grad, eval mode, never wrapped)."""

    def __init__(self, teachers: Sequence[nn.Module], *, temperature: float, alpha: float = 0.0, num_classes: int):
        super().__init__(temperature=temperature, alpha=alpha, num_classes=num_classes)
        if not teachers:
            raise UsageError("OnlineKD: no teachers")
        self.teachers = [freeze(t) for t in teachers]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, student_logits: torch.Tensor,
                 indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check(student_logits)
        probs = ensemble_probs(self.teachers, images, self.temperature)
        return self._loss(student_logits, probs, labels)


class CachedKD(_KDHook):
    """Distil from soft labels looked up by (epoch, sample indices) in a `SoftLabelCache`."""

    def __init__(self, cache: SoftLabelCache, *, temperature: float, alpha: float = 0.0, num_classes: int):
        super().__init__(temperature=temperature, alpha=alpha, num_classes=num_classes)
        if cache.num_classes != num_classes:
            raise RunError(f"{cache.dir}: soft labels have {cache.num_classes} classes, the student {num_classes}")
        if abs(float(cache.meta["temperature"]) - float(temperature)) > 1e-12:
            raise RunError(f"{cache.dir}: soft labels were computed at temperature {cache.meta['temperature']}, "
                           f"distillation uses {temperature}; rebuild the cache")
        self.cache = cache

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, student_logits: torch.Tensor,
                 indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._check(student_logits)
        if indices is None:
            raise RunError("cached distillation needs each batch's sample indices: build the train loader with "
                           "make_loader(..., return_indices=True)")
        if self.epoch is None:
            raise RunError("CachedKD.set_epoch(epoch) was not called: the cached labels depend on the epoch")
        values, classes = self.cache.lookup(self.epoch, indices)
        probs = dense_from_topk(values, classes, self.num_classes)
        return self._loss(student_logits, probs, labels)
