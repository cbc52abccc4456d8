"""Building blocks of every config section: strict models and the training `Schedule`.

Shared by the root config (`kesi_dist.config`) and each method's own section
(`kesi_dist.methods.<name>.config`), so neither imports the other's module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Strict", "Schedule"]


class Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Schedule(Strict):
    """How one model is trained: optimizer, learning-rate schedule, epochs."""

    epochs: int = Field(40, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0, description="base LR (multistep/constant) or max LR (onecycle)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["multistep", "constant", "onecycle"] = "onecycle"
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs at which LR *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    div_factor: float = Field(10.0, ge=1, description="onecycle: initial LR = lr / div_factor")
    pct_start: float = Field(0.1, gt=0, lt=1, description="onecycle: fraction of steps spent warming up")
    final_div_factor: float = Field(100.0, ge=1, description="onecycle: final LR = initial LR / final_div_factor")
