"""The compression methods: each is one folder, registered here under the name `method.name` takes.

A method is a unit: its config section (`config.py`, a pydantic model with `name: Literal[...]`), a
recipe that reads top to bottom (`recipe.py`, `run(cfg, ctx)`), its pruning plan for `kesi plan`
(`plan.py`, `plan(cfg)`), and its report (`report.py`, `build_report(manifest)` + `layout(cfg)`).
Everything else (stages, runtime, runs, the library) is shared and method-neutral. Adding a method
is adding a folder and one `Method` entry below; tests parametrized over METHODS pick it up.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from kesi_dist.methods.ekg.config import EkgCfg
from kesi_dist.methods.kesi.config import KesiCfg
from kesi_dist.methods.swp.config import SwpCfg

__all__ = ["Method", "METHODS"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    config: type  # the `method:` section's pydantic model
    smoke_config: str  # a tiny run of the method, relative to the repository (tests, job submission)
    test_overrides: tuple[str, ...] = ()  # shrink the smoke config further for in-process tests
    latency_target: str = "method.target_latency"  # the config key of its latency budget ({latency_ratio, table})

    def module(self, part: str) -> ModuleType:
        """The method's `recipe`, `plan` or `report` module (imported on first use: they import torch)."""
        return importlib.import_module(f"kesi_dist.methods.{self.name}.{part}")


METHODS: dict[str, Method] = {
    "kesi": Method(
        name="kesi",
        summary="iterative pruning with LR-restart branches, distilled from the ensemble of snapshots",
        config=KesiCfg,
        smoke_config="configs/kesi/smoke.yaml",
        test_overrides=("baseline.epochs=1", "prune.iterations=1", "retrain.epochs=1", "fixed_lr.epochs=1",
                        "distill.epochs=1", "tune.branches=2", "distill.mode=online", "distill.teachers=topk",
                        "distill.num_teachers=2"),
        latency_target="method.prune.target",
    ),
    "ekg": Method(
        name="ekg",
        summary="greedy sub-network search scored by the ensemble of interim sub-networks, then fine-tuning "
                "from a memory bank of their logits",
        config=EkgCfg,
        smoke_config="configs/ekg/smoke.yaml",
        test_overrides=("baseline.epochs=1", "finetune.epochs=1", "finetune.milestones=[]", "target_macs_ratio=0.6",
                        "search.actors=1", "bank.actors=1"),
    ),
    "swp": Method(
        name="swp",
        summary="stage-wise supernets trained in parallel with the sandwich rule and in-place distillation, "
                "then an evolutionary search under a MACs budget",
        config=SwpCfg,
        smoke_config="configs/swp/smoke.yaml",
        test_overrides=("baseline.epochs=1", "supernet.epochs=1", "retrain.epochs=1", "correlation.subnets=2",
                        "search.generations=1", "search.population=6", "search.actors=1"),
    ),
}
