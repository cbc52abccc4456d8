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

A worker process builds its task from a `TaskSpec`, plain data that travels in Ray's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kesi_dist.errors import BadValue, RunError

__all__ = ["TaskOutput", "Task", "TeacherSource", "Classification", "Distillation", "MemoryBankDistillation",
           "TaskSpec", "build_task"]


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
        if temperature <= 0:
            raise BadValue("temperature", f"must be > 0, got {temperature}")
        if not 0 <= alpha <= 1:
            raise BadValue("alpha", f"must be in [0, 1], got {alpha}")
        self.source, self.temperature, self.alpha = source, float(temperature), float(alpha)
        self.needs_indices = source.needs_indices

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __call__(self, model, images, labels, indices=None) -> TaskOutput:
        from kesi_dist.distill.losses import kd_loss

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
        if temperature <= 0:
            raise BadValue("temperature", f"must be > 0, got {temperature}")
        if views < 1:
            raise BadValue("views", f"must be >= 1, got {views}")
        self.bank, self.temperature, self.views, self.seed, self.pad = bank, float(temperature), views, seed, pad
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, model, images, labels, indices=None) -> TaskOutput:
        from kesi_dist.data.augment import views
        from kesi_dist.distill.curriculum import memory_bank_loss

        if indices is None or self.epoch is None:
            raise RunError("memory-bank distillation needs each batch's sample indices and set_epoch(epoch)")
        x = views(images, indices, seed=self.seed, epoch=self.epoch, count=self.views, pad=self.pad)
        logits = model(x).view(len(labels), self.views, -1)
        bank = self.bank.lookup(indices).to(logits.device)
        if bank.shape[1] != logits.shape[-1]:
            raise RunError(f"student outputs {logits.shape[-1]} classes, the memory bank {bank.shape[1]}")
        out = memory_bank_loss(logits, labels, bank, temperature=self.temperature)
        return TaskOutput(out["loss"], logits[:, 0], {k: v for k, v in out.items() if k != "loss"})


@dataclass(frozen=True)
class TaskSpec:
    """A task as plain data. kind "classification"; "distillation" from `teachers` (checkpoint paths
    or URIs, run on every batch: online) or from `soft_labels` (a cache folder: cached);
    "memory_bank" from `memory_bank` (a bank folder) with `views` views per image; or "supernet": the
    frozen baseline `teachers[0]` around stage `stage` (None: the whole net), `mode` sandwich or uniform,
    width fractions `ratios` (widths multiples of `round_to`), `n_random` random configurations per step."""

    kind: str = "classification"
    teachers: tuple[str, ...] = ()
    soft_labels: str | None = None
    temperature: float = 4.0
    alpha: float = 0.0
    memory_bank: str | None = None
    views: int = 2
    stage: int | None = None
    mode: str = "sandwich"
    ratios: tuple[float, ...] = ()
    round_to: int = 1
    n_random: int = 2

    @property
    def source(self) -> str:
        """Where distillation targets come from: memory_bank, cached or online."""
        return "memory_bank" if self.memory_bank else "cached" if self.soft_labels else "online"


def build_task(spec: TaskSpec, *, num_classes: int, device: torch.device, seed: int, resolution: int,
               augment: str, epochs: int, holdout: float = 0, holdout_seed: int = 0) -> Task:
    """The Task of `spec`, in a worker. seed/resolution/augment/epochs/holdout are the worker's loader
    settings: cached soft labels are only valid for the images and augmentation this worker replays."""
    if spec.kind == "classification":
        return Classification()
    if spec.kind == "supernet":
        from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
        from kesi_dist.train.supernet import SupernetTraining

        if not spec.teachers or not spec.ratios:
            raise BadValue("teachers", "a supernet task needs the baseline checkpoint and the width ratios")
        teacher, _ = model_from_checkpoint(load_checkpoint(spec.teachers[0]))
        return SupernetTraining(teacher=teacher, stage=spec.stage, ratios=spec.ratios, mode=spec.mode,
                                n_random=spec.n_random, seed=seed, round_to=spec.round_to)
    if spec.kind == "memory_bank":
        from kesi_dist.data.image_loader import CIFAR_PAD
        from kesi_dist.distill.memory_bank import MemoryBank

        if not spec.memory_bank:
            raise BadValue("memory_bank", "memory-bank distillation needs a bank folder")
        bank = MemoryBank(spec.memory_bank)
        bank.check(holdout=(holdout, holdout_seed if holdout else 0))
        if bank.num_classes != num_classes:
            raise RunError(f"{bank.dir}: the memory bank has {bank.num_classes} classes, the student {num_classes}")
        pad = max(1, round(CIFAR_PAD * resolution / 32))  # CIFAR's 4 px at 32 px, in proportion elsewhere
        return MemoryBankDistillation(bank, temperature=spec.temperature, views=spec.views, seed=seed, pad=pad)
    if spec.kind != "distillation":
        raise BadValue("kind", f"unknown task {spec.kind!r}; choose classification, distillation, memory_bank "
                                   "or supernet")
    from kesi_dist.distill.sources import CachedSoftLabels, OnlineTeachers

    if spec.soft_labels:
        source = CachedSoftLabels(spec.soft_labels, temperature=spec.temperature, num_classes=num_classes)
        source.cache.check(seed=seed, resolution=resolution, augment=augment, epochs=epochs,
                           holdout=(holdout, holdout_seed if holdout else 0))
    elif spec.teachers:
        source = OnlineTeachers.load(list(spec.teachers), temperature=spec.temperature, device=device)
    else:
        raise BadValue("teachers", "distillation needs teacher checkpoints or a soft-label cache")
    return Distillation(source, temperature=spec.temperature, alpha=spec.alpha)
