"""Optimizer and learning-rate schedule from flat arguments (the fields of `kesi_dist.config.Schedule`).

Every schedule is stepped once per *batch*, so multi-step milestones given in epochs are converted to
steps here. Weight decay applies to every parameter (BN and bias included), as in the paper's
reference code (plain `torch.optim.SGD(weight_decay=...)`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from kesi_dist.errors import UsageError

__all__ = ["build_optimizer", "build_scheduler", "current_lr"]


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    optimizer: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 1e-4,
) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay, optional Nesterov) or Adam (L2 weight decay, as torch's Adam)."""
    params = [p for p in params if p.requires_grad]
    if optimizer == "sgd":
        if nesterov and momentum <= 0:
            raise UsageError("schedule.nesterov: needs momentum > 0 (set schedule.momentum, e.g. 0.9)")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"schedule.optimizer: unknown optimizer {optimizer!r}; choose sgd or adam")


def build_scheduler(
    opt: torch.optim.Optimizer,
    *,
    schedule: str,
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    milestones: list[int] | tuple[int, ...] = (),
    gamma: float = 0.1,
    div_factor: float = 10.0,
    pct_start: float = 0.1,
    final_div_factor: float = 100.0,
    momentum_cycle: tuple[float, float] | None = (0.85, 0.95),
) -> LRScheduler:
    """A scheduler stepped once per batch.

    Args:
        schedule: "constant" (lr throughout), "multistep" (lr * gamma at each epoch in `milestones`) or
            "onecycle" (`OneCycleLR`, cosine, two phases: lr/div_factor -> lr over pct_start of the
            steps, then down to lr/div_factor/final_div_factor), the paper's LR restart. Momentum (beta1
            for Adam) cycles over `momentum_cycle` = (base, max), max -> base -> max, torch's default
            and what the reference code ran; None keeps the optimizer's momentum fixed, and so does SGD
            without momentum.
        epochs, steps_per_epoch: the run's length; the schedule is laid out over epochs * steps.
        lr: base LR (constant/multistep) or max LR (onecycle). The optimizer's LR is overwritten.
    """
    if steps_per_epoch < 1:
        raise UsageError(f"steps_per_epoch must be >= 1, got {steps_per_epoch} (batch larger than the data?)")
    for group in opt.param_groups:
        group["lr"] = lr
    if schedule == "constant":
        return LambdaLR(opt, lambda step: 1.0)
    if schedule == "multistep":
        bounds = sorted(int(m) * steps_per_epoch for m in milestones)
        return LambdaLR(opt, lambda step: gamma ** sum(step >= b for b in bounds))
    if schedule == "onecycle":
        return OneCycleLR(
            opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=pct_start,
            anneal_strategy="cos", div_factor=div_factor, final_div_factor=final_div_factor,
            three_phase=False, cycle_momentum=momentum_cycle is not None and _has_momentum(opt),
            **({"base_momentum": momentum_cycle[0], "max_momentum": momentum_cycle[1]} if momentum_cycle else {}),
        )
    raise UsageError(f"schedule.schedule: unknown schedule {schedule!r}; choose multistep, constant or onecycle")


def _has_momentum(opt: torch.optim.Optimizer) -> bool:
    return "betas" in opt.defaults or opt.defaults.get("momentum", 0) > 0


def current_lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])
