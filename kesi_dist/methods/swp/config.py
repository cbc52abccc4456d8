"""SWP's config section (`method: {name: swp, ...}`): the width space, the stage supernets' training,
the proxy and the evolutionary search under a MACs budget, retraining and the correlation study."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from kesi_dist.budget import SearchBudgetCfg
from kesi_dist.errors import UsageError
from kesi_dist.schema import Schedule, Strict

__all__ = ["SwpCfg", "SupernetCfg", "SearchCfg", "CorrelationCfg"]


class SupernetCfg(Schedule):
    """How every supernet trains (one per stage, and the whole-network one of the correlation study)."""

    epochs: int = Field(40, ge=1)
    lr: float = Field(0.01, gt=0)
    schedule: Literal["multistep", "constant", "onecycle"] = "onecycle"
    ratios: list[float] = Field(default_factory=lambda: [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
                                description="width choices of every unit, as fractions of its channels (the "
                                "first k by L1 norm are kept); the smallest is the tiny net, 1.0 the full one")
    round_to: int = Field(1, ge=1, le=512, description="every width choice rounded to a multiple of this (at most "
                          "the unit's channels), so the searched net and the uniform arm have aligned widths")
    n_random: int = Field(2, ge=0, description="random configurations per step besides the full and the tiny one "
                          "(sandwich rule)")
    cpus_per_worker: float | None = Field(None, gt=0, description="each supernet run's worker CPUs (default: "
                                          "train.cpus_per_worker); a fraction lets every stage train at once on few "
                                          "cores")
    gpus_per_worker: float | None = Field(None, ge=0, description="each supernet run's worker GPUs (default: "
                                          "train.gpus_per_worker); a fraction shares a GPU between stages")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < r <= 1 for r in v) or 1.0 not in v:
            raise ValueError(f"give fractions in (0, 1] including 1.0 (the full width), got {v}")
        return sorted(set(v))


class SearchCfg(Strict):
    population: int = Field(50, ge=4)
    generations: int = Field(20, ge=1)
    parents: float = Field(0.25, gt=0, lt=1, description="fraction of the population kept as parents")
    mutation: float = Field(0.5, ge=0, le=1, description="fraction of the children made by mutation (the rest by "
                            "crossover)")
    mutate_prob: float = Field(0.1, gt=0, le=1, description="probability that a mutation redraws a unit's width")
    band: float = Field(0.02, gt=0, lt=1, description="every candidate's MACs lie in [target - band, target] x the "
                        "baseline's (resampled until they do, as OFA resamples to its constraint)")
    calib_batches: int = Field(5, ge=1, description="training batches (data.batch_size, clean) that recalibrate "
                               "BatchNorm before each proxy evaluation")
    actors: int = Field(2, ge=1, description="Ray actors evaluating proxies in parallel (each holds the supernets, "
                        "the calibration batches and the holdout)")


class CorrelationCfg(Strict):
    subnets: int = Field(0, ge=0, description="sub-nets near the budget retrained to measure how well each supernet's "
                         "proxy ranks them (Kendall tau, Spearman rho, mean gap); 0 = no study")


class SwpCfg(SearchBudgetCfg):
    """SWP: stage-wise supernets trained in parallel with the sandwich rule and in-place distillation, then
    an evolutionary search under a budget (`SearchBudgetCfg`)."""

    name: Literal["swp"] = "swp"
    supernet: SupernetCfg = SupernetCfg()
    search: SearchCfg = SearchCfg()
    retrain: Schedule = Field(default_factory=Schedule, description="how every chosen sub-net is retrained (the "
                              "searched one, the uniform one, the correlation study's)")
    uniform: bool = Field(True, description="retrain a uniformly pruned net at the same MACs: what the search is worth")
    correlation: CorrelationCfg = CorrelationCfg()

    ARG_KEYS: ClassVar[dict[str, str]] = {"target": "method.target_macs_ratio"}

    def check(self, root: Any) -> None:
        import torch  # torch: the config module loads without it

        from kesi_dist.models import build_model

        if not root.data.holdout:
            raise UsageError("data.holdout: SWP's search scores sub-nets on the held-out split, and it is 0; set a "
                             "fraction or a count per class")
        with torch.device("meta"):  # the structure only
            staged = build_model(root.model.arch, 10).num_stages
        if not staged:
            raise UsageError(f"model.arch: {root.model.arch} has no fixed-width stages (a stage's output is a pruned "
                             "unit), so it cannot be split into stage-wise supernets; use a residual net")
        if self.budget().ratio - self.search.band <= 0:
            raise UsageError("method.search.band: as wide as the target; lower it")
