"""The budget a method prunes or searches to: one object per run, built once, taken by every search,
uniform arm, plan and report.

    budget = run_budget(cfg)                  # the method's budget, its table read and checked; None: none
    cost = budget.cost(model, (3, 32, 32))    # widths -> what the target bounds (MACs, predicted ms, ...)
    budget.ratio, budget.kind, budget.table, budget.label

A method's config says which budget it has (`cfg.method.budget()`, an unloaded `Budget`: enough for a
report's words; `LatencyTargetCfg` and `SearchBudgetCfg` are the config blocks that give one); `run_budget` loads what its cost needs (a latency table, checked against the network)
once, before anything runs. A budget kind is one class: its `kind`, its words and its `cost`;
`MacsBudget` counts MACs (`kesi_dist.pruning.macs_function`: a depthwise unit's cost is linear in its
width), `LatencyBudget` predicts onnxruntime latency from a profiled table (`kesi_dist.latency_table`).

Plain Python at import (a config imports it); torch is imported where a cost is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

from pydantic import Field

from kesi_dist.errors import UsageError
from kesi_dist.fields import get_field
from kesi_dist.latency_table import load_table, plan_latency, predict, table_warnings, warn_once
from kesi_dist.model_config import default_num_classes
from kesi_dist.schema import Strict

__all__ = ["Budget", "MacsBudget", "LatencyBudget", "BUDGETS", "LatencyTargetCfg", "SearchBudgetCfg", "run_budget",
           "network_of", "reached", "recorded_budget", "search_fields"]

Cost = Callable[[Sequence[int]], float]


@dataclass(frozen=True)
class Budget:
    """`ratio` x the baseline's cost, set at config key `key`."""

    ratio: float
    key: str
    kind: ClassVar[str] = ""
    noun: ClassVar[str] = ""  # what is bounded, in a sentence: "MACs", "predicted latency"
    short: ClassVar[str] = ""  # in "equal MACs", "equal latency"
    table: ClassVar[dict | None] = None  # what the cost reads besides the model, if anything

    @property
    def label(self) -> str:
        """"45% of its MACs", "80% of its predicted latency"."""
        return f"{100 * self.ratio:.0f}% of its {self.noun}"

    def load(self, network: dict) -> "Budget":
        """This budget with what its cost reads loaded and checked against `network` (`network_of`)."""
        return self

    def cost(self, model: Any = None, input_shape: tuple | None = None) -> Cost:
        """widths (one per unit of `model`) -> the cost the ratio bounds."""
        raise NotImplementedError

    def amount(self, base: float) -> str:
        """The baseline's cost in words ("the baseline's 4.1 M MACs")."""
        raise NotImplementedError

    @classmethod
    def besides_macs(cls, ratio: float | None) -> str:
        """What a progress line adds after the MACs ratio: the bounded cost's own ratio (nothing for MACs)."""
        return "" if ratio is None else f", {cls.noun} {100 * ratio:.1f}%"

    @classmethod
    def target_words(cls, target: float) -> str:
        """"target 60% of the latency" (`kesi status`)."""
        return f"target {100 * target:.0f}% of the {cls.short}"

    def record(self) -> dict:
        """The search stage's manifest fields naming the target (`kesi status` and reports read them)."""
        return {"target_macs_ratio": None, "target_latency_ratio": None, f"target_{self.kind}_ratio": self.ratio}

    def plan(self, out: dict, base: float) -> dict:
        """A `kesi plan` dict with the budget's own fields (the title's target, predicted ms per row)."""
        return out

    @classmethod
    def reached(cls, target: float, record: dict) -> str:
        """Where a search ended, in words, from its record (`budget_ratio`: the bounded cost's ratio)."""
        return (f"{100 * record['budget_ratio']:.2f} % of the baseline's {cls.noun} (target {100 * target:.0f} %; "
                f"MACs {100 * record['macs_ratio']:.2f} %)")


@dataclass(frozen=True)
class MacsBudget(Budget):
    kind: ClassVar[str] = "macs"
    noun: ClassVar[str] = "MACs"
    short: ClassVar[str] = "MACs"

    def cost(self, model: Any = None, input_shape: tuple | None = None) -> Cost:
        from kesi_dist.pruning import macs_function  # torch

        if model is None or input_shape is None:
            raise ValueError("a MACs budget's cost counts a model's layers: give the model and its input shape")
        return macs_function(model, tuple(input_shape))

    def amount(self, base: float) -> str:
        return f"the baseline's {base / 1e6:.1f} M MACs"

    @classmethod
    def besides_macs(cls, ratio: float | None) -> str:
        return ""

    @classmethod
    def target_words(cls, target: float) -> str:
        return f"target {100 * target:.0f}%"

    def plan(self, out: dict, base: float) -> dict:
        return {**out, "target_macs_ratio": self.ratio, "target_macs": int(self.ratio * base)}

    @classmethod
    def reached(cls, target: float, record: dict) -> str:
        return f"{100 * record['macs_ratio']:.2f} % of the baseline's MACs (target {100 * target:.0f} %)"


@dataclass(frozen=True)
class LatencyBudget(Budget):
    """Predicted onnxruntime latency (the table's batch and threads) from the table at `table_path`."""

    table_path: str = ""
    table: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    kind: ClassVar[str] = "latency"
    noun: ClassVar[str] = "predicted latency"
    short: ClassVar[str] = "latency"

    def load(self, network: dict) -> "LatencyBudget":
        """The table read and checked against `network`, its warnings said once; UsageError naming
        `<key>.table` otherwise."""
        from kesi_dist.latency import check_profilable  # torch

        check_profilable(network["arch"], f"{self.key}: ")
        try:
            table = load_table(self.table_path)
            said = table_warnings(table, self.table_path, **network)
        except UsageError as e:
            raise UsageError(f"{self.key}.table: {e}") from None
        for w in said:  # as `kesi plan --latency` says them: the budget is for the table's machine
            warn_once(f"{self.key}.table: {w}")
        return dataclasses.replace(self, table=table)

    def cost(self, model: Any = None, input_shape: tuple | None = None) -> Cost:
        """The table's prediction: from the widths alone (`model` and `input_shape` are not needed)."""
        if self.table is None:
            raise ValueError(f"{self.key}: the latency table is not loaded (run_budget loads it)")
        table = self.table
        return lambda widths: predict(table, list(widths))

    def amount(self, base: float) -> str:
        return f"the baseline's predicted {base:.2f} ms"

    def plan(self, out: dict, base: float) -> dict:
        return plan_latency(out, self.table)


class LatencyTargetCfg(Strict):
    latency_ratio: float = Field(gt=0, lt=1, description="the student's predicted latency as a fraction of the "
                                 "baseline's (the table's batch and threads)")
    table: str = Field(description="JSON table from `kesi latency profile` for this network and the machine it "
                                   "will serve on")

    def budget(self, key: str) -> LatencyBudget:
        return LatencyBudget(self.latency_ratio, key, table_path=self.table)


class SearchBudgetCfg(Strict):
    """The budget block of a method that searches for a sub-network (EKG, SWP): MACs, or a latency table."""

    name: str  # each method narrows it to its own name (first, as in every method's section)
    target_macs_ratio: float = Field(0.45, gt=0, lt=1, description="the searched sub-network's MACs budget, as a "
                                     "fraction of the baseline's (the search ends at or under it)")
    target_latency: LatencyTargetCfg | None = Field(None, description="search under this fraction of the baseline's "
                                                    "predicted latency instead of target_macs_ratio (the uniform "
                                                    "arm too)")

    def budget(self) -> Budget:
        """The search's budget: of the predicted latency when target_latency is set, else of the MACs."""
        if self.target_latency is not None:
            return self.target_latency.budget("method.target_latency")
        return MacsBudget(self.target_macs_ratio, "method.target_macs_ratio")


BUDGETS: dict[str, type[Budget]] = {b.kind: b for b in (MacsBudget, LatencyBudget)}


def recorded_budget(record: dict, where: str) -> tuple[type[Budget], float] | None:
    """(the budget class, its target) a search stage's record names (`Budget.record`), each field checked
    (`FieldError` naming it); None when it names none (a run from before budgets were recorded)."""
    for kind, cls in BUDGETS.items():
        target = get_field(record, f"target_{kind}_ratio", float, where, required=False)
        if target is not None:
            return cls, target
    return None


def search_fields(record: dict) -> dict:
    """The budget's fields of a search stage's record, for a report: each kind's target, the MACs ratio
    and the bounded cost's ratio reached."""
    return {**{f"target_{kind}_ratio": record.get(f"target_{kind}_ratio") for kind in BUDGETS},
            "macs_ratio": record.get("macs_ratio"), "budget_ratio": record.get("budget_ratio")}


def reached(record: dict) -> str | None:
    """Where a search stage ended against its budget, in words (report.md), from its record (the fields
    of `Budget.record`, `macs_ratio`, `budget_ratio`); None when it names no target."""
    for kind, cls in BUDGETS.items():
        target = record.get(f"target_{kind}_ratio")
        if target:
            return cls.reached(target, record)
    return None


def network_of(cfg: Any) -> dict:
    """What a latency table is checked against: the root config's network (classes as the data's, when
    they can be known before the data is read)."""
    return {"arch": cfg.model.arch, "num_classes": default_num_classes(cfg), "resolution": cfg.data.resolution,
            "options": cfg.model.options()}


def run_budget(cfg: Any) -> Budget | None:
    """The budget of the root config's method, loaded (its table read and checked against the network);
    None when the method has none (KESI without `prune.target`: the schedule as written)."""
    budget = cfg.method.budget()
    return None if budget is None else budget.load(network_of(cfg))
