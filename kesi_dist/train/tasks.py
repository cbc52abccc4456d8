"""What a training step optimises: a Task owns the forward pass and returns the loss.

The loop (`kesi_dist.train.loop.train_epoch`) calls `task(model, images, labels, indices)` inside
autocast and gets a `TaskOutput`: the loss it backpropagates once per step, the logits it scores train
accuracy on, and named `parts` it logs as `train/<name>`. A task may call the model any number of
times (several sub-networks per step, SWP's sandwich rule) without the loop changing.

- `Classification`: cross-entropy on the labels.
- `Distillation`: the student learns from a `TeacherSource` (frozen teachers run on the batch, or
  soft labels cached per (epoch, sample)), KL at temperature T, plus `alpha` x cross-entropy.
- `MemoryBankDistillation`: EKG's fine-tuning: V augmented views of each clean image, CE plus T x KL to
  the curriculum target of a memory bank of teacher logits (`kesi_dist.distill.curriculum`). It makes
  its views itself, so its loader serves clean images (`augments = True`).
- `SupernetTraining` (`kesi_dist.train.supernet`): several width configurations of a slimmable net per
  step (SWP's sandwich rule with in-place distillation, or uniform sampling). A task with `prepare(model)`
  hands the worker the module to train and wrap (the supernet inside the frozen baseline); the worker
  still saves `model` itself.

A worker process builds its task from a spec (`kesi_dist.train.task_specs`), plain data that travels in
Ray's config and is checked when it is made: the classes here take checked values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kesi_dist.distill.curriculum import memory_bank_loss
from kesi_dist.distill.losses import kd_loss
from kesi_dist.errors import RunError

__all__ = ["TaskOutput", "Task", "TeacherSource", "Classification", "Distillation", "MemoryBankDistillation"]


@dataclass
class TaskOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # train accuracy is scored on these
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as train/<name>


class Task(Protocol):
    needs_indices: bool  # the loader must yield each sample's index (cached soft labels)
    augments: bool  # the task augments the batch itself: the loader serves clean images

    def set_epoch(self, epoch: int) -> None: ...

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 indices: torch.Tensor | None) -> TaskOutput: ...


class TeacherSource(Protocol):
    """The teachers' temperature-softened class probabilities for a batch (`kesi_dist.distill.sources`)."""

    needs_indices: bool
    num_classes: int

    def set_epoch(self, epoch: int) -> None: ...

    def probs(self, images: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor: ...


class Classification:
    needs_indices = False
    augments = False

    def set_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, model, images, labels, indices=None) -> TaskOutput:
        logits = model(images)
        return TaskOutput(F.cross_entropy(logits, labels), logits)


class Distillation:
    """KESI's loss: KL(teacher probs || softmax(student / T)) * T^2, plus `alpha` x CE (`kd_loss`)."""

    augments = False

    def __init__(self, source: TeacherSource, *, temperature: float, alpha: float = 0.0):
        self.source, self.temperature, self.alpha = source, float(temperature), float(alpha)
        self.needs_indices = source.needs_indices

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __call__(self, model, images, labels, indices=None) -> TaskOutput:
        logits = model(images)
        if logits.dim() != 2 or logits.shape[1] != self.source.num_classes:
            raise RunError(f"student outputs {tuple(logits.shape)} but the distillation targets have "
                           f"{self.source.num_classes} classes; student and teachers must share the label set")
        probs = self.source.probs(images, indices)
        out = kd_loss(logits, probs.to(logits.device), labels, temperature=self.temperature, alpha=self.alpha)
        return TaskOutput(out["loss"], logits, {k: v for k, v in out.items() if k != "loss"})


class MemoryBankDistillation:
    """EKG's loss (`memory_bank_loss`): `views` views of each image (reflect-pad + crop + flip, keyed by
    (seed, epoch, sample, view)), CE + T x KL to the bank's curriculum target, averaged over views."""

    needs_indices = True
    augments = True

    def __init__(self, bank, *, temperature: float, views: int, seed: int, pad: int):
        self.bank, self.temperature, self.views, self.seed, self.pad = bank, float(temperature), views, seed, pad
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, model, images, labels, indices=None) -> TaskOutput:
        from kesi_dist.data.augment import views  # numba: compiled on first use, in the worker only

        if indices is None or self.epoch is None:
            raise RunError("memory-bank distillation needs each batch's sample indices and set_epoch(epoch)")
        x = views(images, indices, seed=self.seed, epoch=self.epoch, count=self.views, pad=self.pad)
        logits = model(x).view(len(labels), self.views, -1)
        bank = self.bank.lookup(indices).to(logits.device)
        if bank.shape[1] != logits.shape[-1]:
            raise RunError(f"student outputs {logits.shape[-1]} classes, the memory bank {bank.shape[1]}")
        out = memory_bank_loss(logits, labels, bank, temperature=self.temperature)
        return TaskOutput(out["loss"], logits[:, 0], {k: v for k, v in out.items() if k != "loss"})
