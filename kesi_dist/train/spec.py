"""Flat, picklable descriptions of one training run (what travels to every worker in its config).

They mirror the config sections without being them: stages unpack `kesi_dist.config` objects into
these, so the Config never leaks into library code, and `dataclasses.asdict` makes them plain dicts
for Ray's `train_loop_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["ModelSpec", "ScheduleSpec", "LoaderSpec", "EngineSpec", "schedule_from", "selection_key"]


@dataclass(frozen=True)
class ModelSpec:
    """The model to train: built from (arch, num_classes, widths), or loaded from a kesi checkpoint.

    `init_checkpoint` (local path or storage URI, kesi_dist checkpoint format) overrides arch/widths
    with the checkpoint's own and brings its MWP masks, which the loop then enforces every step.
    """

    arch: str
    num_classes: int = 10
    widths: list | None = None
    init_checkpoint: str | None = None
    options: dict = field(default_factory=dict)  # the architecture's own choices (`build_model(**options)`)


@dataclass(frozen=True)
class ScheduleSpec:
    """Optimizer + LR schedule + length; the fields of `kesi_dist.config.Schedule`."""

    epochs: int = 40
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float | None = 0.9  # None: the one-cycle momentum cycle's (momentum_cycle)
    momentum_cycle: tuple[float, float] | None = (0.85, 0.95)  # onecycle: (base, max) momentum / Adam beta1
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    div_factor: float = 10.0
    pct_start: float = 0.1
    final_div_factor: float = 100.0


@dataclass(frozen=True)
class LoaderSpec:
    """Where the prepared data lives and how each worker reads it.

    `batch_size` is the GLOBAL batch (the paper's 128): each of N workers reads batch_size / N.
    `holdout` > 0 keeps that part of train.beton out of training (`kesi_dist.data.holdout`, drawn with
    `holdout_seed`): it is evaluated every epoch and is what selection compares; the test split (val)
    is evaluated once, after the last epoch. With 0, val is evaluated every epoch and selects too.
    """

    data_dir: str
    batch_size: int = 128
    resolution: int = 32
    augment: str = "cifar"
    backend: str = "ffcv"
    num_workers: int = 2
    holdout: float = 0.0
    holdout_seed: int = 0

    @property
    def split_args(self) -> dict:
        """The keywords `make_loader` needs to tell train from holdout."""
        return {"holdout": self.holdout, "holdout_seed": self.holdout_seed}


@dataclass(frozen=True)
class EngineSpec:
    """Placement and engine of the worker group (`kesi_dist.config.TrainCfg`)."""

    engine: str = "ddp"
    zero_stage: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    bf16: bool = True
    channels_last: bool = True
    max_failures: int = 2


def selection_key(loader: LoaderSpec) -> str:
    """The per-epoch metric selection compares: holdout accuracy, or the test split's without a holdout."""
    return "holdout/acc" if loader.holdout else "val/acc"


def schedule_from(obj: Any, **overrides: Any) -> ScheduleSpec:
    """A ScheduleSpec from any object with the Schedule fields (e.g. `cfg.baseline`), plus overrides."""
    values = {f.name: getattr(obj, f.name) for f in fields(ScheduleSpec) if hasattr(obj, f.name)}
    values.update(overrides)
    values["milestones"] = list(values.get("milestones") or [])
    return ScheduleSpec(**values)
