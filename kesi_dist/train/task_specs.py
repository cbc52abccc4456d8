"""What a training run optimises, as plain data: one frozen, picklable spec per task kind, checked once
when it is made, that a worker turns into its `Task` (`spec.build(env)`).

    ClassificationSpec()                                    cross-entropy on the labels
    DistillationSpec(temperature, alpha, teachers=...)      KESI: frozen teachers run on every batch (online)
    DistillationSpec(temperature, alpha, soft_labels=...)   ... or soft labels cached per (epoch, sample)
    MemoryBankSpec(memory_bank, temperature, views)         EKG: a memory bank of teacher logits, V views
    SupernetSpec(baseline, ratios, stage, mode, ...)        SWP: a stage supernet inside the frozen baseline

A spec travels to every worker inside Ray's config as it is (pickled, never rebuilt from a dict); what
only the worker knows (its classes, device, seed and loader settings) comes in a `WorkerEnv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
from kesi_dist.data.image_loader import CIFAR_PAD
from kesi_dist.distill.memory_bank_cache import MemoryBank
from kesi_dist.distill.sources import CachedSoftLabels, OnlineTeachers
from kesi_dist.errors import BadValue, RunError
from kesi_dist.train.supernet import MODES, SupernetTraining
from kesi_dist.train.tasks import Classification, Distillation, MemoryBankDistillation, Task

__all__ = ["WorkerEnv", "TaskSpec", "ClassificationSpec", "DistillationSpec", "MemoryBankSpec", "SupernetSpec"]


@dataclass(frozen=True)
class WorkerEnv:
    """What a worker knows when it builds its task: the model's classes, its device, and its loader's
    seed, resolution, augmentation, epochs and held-out split (cached targets are only valid for the
    images and augmentation this worker replays)."""

    num_classes: int
    device: torch.device
    seed: int
    resolution: int
    augment: str
    epochs: int
    holdout: float = 0
    holdout_seed: int = 0

    @property
    def split(self) -> tuple[float, int]:
        """(holdout, its seed) as caches record them: the seed is 0 without a holdout."""
        return self.holdout, self.holdout_seed if self.holdout else 0


class TaskSpec(Protocol):
    source: str  # where the targets come from, for the logs: labels, online, cached, memory_bank, supernet

    def build(self, env: WorkerEnv) -> Task: ...


def _temperature(t: float) -> float:
    if not t > 0:
        raise BadValue("temperature", f"must be > 0, got {t}")
    return float(t)


@dataclass(frozen=True)
class ClassificationSpec:
    source = "labels"

    def build(self, env: WorkerEnv) -> Task:
        return Classification()


@dataclass(frozen=True)
class DistillationSpec:
    """KESI's distillation at `temperature` plus `alpha` x CE, from exactly one of `teachers` (checkpoint
    paths or URIs, run on every batch) or `soft_labels` (a cache folder)."""

    temperature: float
    alpha: float = 0.0
    teachers: tuple[str, ...] = ()
    soft_labels: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "temperature", _temperature(self.temperature))
        if not 0 <= self.alpha <= 1:
            raise BadValue("alpha", f"must be in [0, 1], got {self.alpha}")
        if bool(self.teachers) == bool(self.soft_labels):
            raise BadValue("teachers", "distillation needs either teacher checkpoints or a soft-label cache")
        object.__setattr__(self, "teachers", tuple(self.teachers))

    @property
    def source(self) -> str:
        return "cached" if self.soft_labels else "online"

    def build(self, env: WorkerEnv) -> Task:
        if self.soft_labels:
            teachers = CachedSoftLabels(self.soft_labels, temperature=self.temperature, num_classes=env.num_classes)
            teachers.cache.check(seed=env.seed, resolution=env.resolution, augment=env.augment, epochs=env.epochs,
                                 holdout=env.split)
        else:
            teachers = OnlineTeachers.load(list(self.teachers), temperature=self.temperature, device=env.device)
        return Distillation(teachers, temperature=self.temperature, alpha=self.alpha)


@dataclass(frozen=True)
class MemoryBankSpec:
    """EKG's fine-tuning: `views` augmented views of each image, CE + T x KL to the curriculum target of
    the memory bank in folder `memory_bank`."""

    memory_bank: str
    temperature: float
    views: int = 2
    source = "memory_bank"

    def __post_init__(self):
        object.__setattr__(self, "temperature", _temperature(self.temperature))
        if self.views < 1:
            raise BadValue("views", f"must be >= 1, got {self.views}")
        if not self.memory_bank:
            raise BadValue("memory_bank", "memory-bank distillation needs a bank folder")

    def build(self, env: WorkerEnv) -> Task:
        bank = MemoryBank(self.memory_bank)
        bank.check(holdout=env.split)
        if bank.num_classes != env.num_classes:
            raise RunError(f"{bank.dir}: the memory bank has {bank.num_classes} classes, the student {env.num_classes}")
        pad = max(1, round(CIFAR_PAD * env.resolution / 32))  # CIFAR's 4 px at 32 px, in proportion elsewhere
        return MemoryBankDistillation(bank, temperature=self.temperature, views=self.views, seed=env.seed, pad=pad)


@dataclass(frozen=True)
class SupernetSpec:
    """SWP: the frozen baseline `baseline` (a checkpoint) around stage `stage` (None: the whole net),
    `mode` sandwich or uniform, width fractions `ratios` (widths multiples of `round_to`), `n_random`
    random configurations per step."""

    baseline: str
    ratios: tuple[float, ...]
    stage: int | None = None
    mode: str = "sandwich"
    round_to: int = 1
    n_random: int = 2
    source = "supernet"

    def __post_init__(self):
        if not self.baseline or not self.ratios:
            raise BadValue("ratios", "a supernet task needs the baseline checkpoint and the width ratios")
        if self.mode not in MODES:
            raise BadValue("mode", f"{self.mode!r}: choose one of {', '.join(MODES)}")
        object.__setattr__(self, "ratios", tuple(self.ratios))

    def build(self, env: WorkerEnv) -> Task:
        teacher, _ = model_from_checkpoint(load_checkpoint(self.baseline))
        return SupernetTraining(teacher=teacher, stage=self.stage, ratios=self.ratios, mode=self.mode,
                                n_random=self.n_random, seed=env.seed, round_to=self.round_to)
