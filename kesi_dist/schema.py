"""Building blocks of every config section: strict models, the training `Schedule`, `describe`.

Shared by the root config (`kesi_dist.config`) and each method's own section
(`kesi_dist.methods.<name>.config`), so neither imports the other's module.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Strict", "Schedule", "describe"]


class Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Schedule(Strict):
    """How one model is trained: optimizer, learning-rate schedule, epochs."""

    epochs: int = Field(40, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0, description="base LR (multistep/constant) or max LR (onecycle)")
    momentum: float | None = Field(None, ge=0, lt=1, description="SGD momentum (default 0.9); with onecycle and "
                                   "momentum_cycle it is the cycle's, so this key must stay unset")
    momentum_cycle: tuple[float, float] | None = Field(
        (0.85, 0.95), description="onecycle only: [base, max] momentum (Adam: beta1), max -> base while the LR warms "
        "up and back while it anneals, as torch's OneCycleLR and the reference code; null = a fixed `momentum`")
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["multistep", "constant", "onecycle"] = "onecycle"
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs at which LR *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    div_factor: float = Field(10.0, ge=1, description="onecycle: initial LR = lr / div_factor")
    pct_start: float = Field(0.1, gt=0, lt=1, description="onecycle: fraction of steps spent warming up")
    final_div_factor: float = Field(100.0, ge=1, description="onecycle: final LR = initial LR / final_div_factor")

    @model_validator(mode="before")
    @classmethod
    def _momentum_that_runs(cls, data: Any) -> Any:
        """The config says what runs: one-cycle's momentum cycle replaces `momentum`, so both are refused."""
        if not isinstance(data, dict):
            return data
        schedule = data.get("schedule", cls.model_fields["schedule"].default)
        cycling = schedule == "onecycle" and data.get("momentum_cycle", cls.model_fields["momentum_cycle"].default)
        if cycling and data.get("momentum") is not None:
            lo, hi = data.get("momentum_cycle", cls.model_fields["momentum_cycle"].default)
            raise ValueError(f"momentum {data['momentum']} would not be used: onecycle cycles momentum between "
                             f"{lo} and {hi} (momentum_cycle); remove momentum, or set momentum_cycle: null to "
                             "train with a fixed momentum")
        if not cycling and data.get("momentum") is None:
            data = {**data, "momentum": 0.9}
        return data


def describe(cfg: BaseModel) -> str:
    """Every key of `cfg` on its own line: dotted key, value, allowed values and the field's description
    (`kesi config --describe`)."""
    lines: list[str] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel):
                walk(value, f"{key}.")
                continue
            allowed = [a for a in get_args(field.annotation) if a is not type(None)]
            literal = next((get_args(a) for a in [field.annotation, *allowed]
                            if get_origin(a) is Literal), ())
            notes = [f"one of {', '.join(map(str, literal))}"] if literal else []
            notes += [field.description] if field.description else []
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"{key}: {shown}" + (f"    # {'; '.join(notes)}" if notes else ""))

    walk(cfg, "")
    return "\n".join(lines) + "\n"
