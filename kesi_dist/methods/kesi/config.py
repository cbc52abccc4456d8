"""KESI's config section (`method: {name: kesi, ...}`): pruning, retraining arms, the search, distillation."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from kesi_dist.budget import LatencyBudget, LatencyTargetCfg
from kesi_dist.schema import Schedule, Strict

__all__ = ["KesiCfg", "PruneCfg", "FixedLRCfg", "TuneCfg", "DistillCfg"]


class PruneCfg(Strict):
    method: Literal["pfec", "mwp"] = "pfec"
    iterations: int = Field(5, ge=1, le=50)
    stage_ratios: list[float] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3],
        description="pfec: fraction of filters removed per iteration in each stage (compounds)",
    )
    skip: list[str] = Field(default_factory=list, description="pfec: units never pruned (e.g. layer1.7)")
    layer_ratios: dict[str, float] = Field(default_factory=dict, description="pfec: per-unit ratio overrides")
    round_to: int = Field(1, ge=1, le=512, description="pfec: every kept filter count a multiple of this (the "
                          "paper's width rounded to the nearest multiple, never zero; 8 or 16 match CPU/GPU "
                          "kernels' channel blocks); 1 = the paper's widths")
    stream: bool = Field(False, description="pfec on a torchvision/timm network: also prune its stream units "
                         "(channels summed by residual additions, kind 'stream' in `kesi plan --units`); false "
                         "keeps them whole as the paper does for ResNets (only a block's inner widths go)")
    target: LatencyTargetCfg | None = Field(None, description="pfec: scale stage_ratios/layer_ratios by the "
                                            "least factor whose last iteration meets this measured-latency budget")
    targets: list[float] = Field(
        default_factory=lambda: [0.22, 0.39, 0.51, 0.59, 0.66],
        description="mwp: cumulative fraction of conv weights that are zero after each iteration",
    )

    @field_validator("stage_ratios")
    @classmethod
    def _ratios_in_range(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0 <= r < 1:
                raise ValueError(f"must be in [0, 1), got {r}")
        return v

    @field_validator("layer_ratios")
    @classmethod
    def _layer_ratios_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for k, r in v.items():
            if not 0 <= r < 1:
                raise ValueError(f"{k}: must be in [0, 1), got {r}")
        return v

    @field_validator("targets")
    @classmethod
    def _targets_increasing(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0 <= r < 1:
                raise ValueError(f"must be in [0, 1), got {r}")
        if any(b < a for a, b in zip(v, v[1:])):
            raise ValueError(f"must be non-decreasing (cumulative sparsity), got {v}")
        return v

    @model_validator(mode="after")
    def _mwp_targets_cover_iterations(self) -> "PruneCfg":
        if self.method == "mwp" and self.target is not None:
            raise ValueError("prune.target (a latency budget) needs pfec: mwp's zeroed weights leave the dense "
                             "network's latency unchanged")
        if self.method == "mwp" and self.stream:
            raise ValueError("prune.stream applies to pfec's filter groups; mwp zeroes single weights of every "
                             "layer, so leave stream at false or use method: pfec")
        if self.method == "mwp" and self.round_to != 1:
            raise ValueError("prune.round_to applies to pfec's filter counts; mwp zeroes single weights, "
                             "so leave round_to at 1 or use method: pfec")
        if self.method == "mwp" and len(self.targets) < self.iterations:
            raise ValueError(
                f"prune.targets has {len(self.targets)} values but prune.iterations is {self.iterations}; "
                "give one cumulative sparsity per iteration"
            )
        return self


class FixedLRCfg(Schedule):
    """The paper's comparison arm: the same pruning chain retrained with a small fixed LR."""

    enabled: bool = True
    lr: float = Field(0.001, gt=0)
    schedule: Literal["multistep", "constant", "onecycle"] = "constant"


# (exclusive lower bound, inclusive upper bound, what a value must be) of each searchable field
_SPACE_RANGES = {"lr": (0, float("inf"), "> 0"), "pct_start": (0, 0.999999, "in (0, 1)"),
                 "epochs": (0, 1e6, ">= 1"), "div_factor": (0.999999, float("inf"), ">= 1"),
                 "final_div_factor": (0.999999, float("inf"), ">= 1"), "weight_decay": (0, float("inf"), ">= 0")}


class TuneCfg(Strict):
    branches: int = Field(2, ge=1, description="parallel LR-restart trials per iteration")
    search: Literal["grid", "random"] = "grid"
    space: dict[str, list[float]] = Field(
        default_factory=lambda: {"lr": [0.1, 0.05]},
        description="retrain fields searched per branch: lr, pct_start, epochs, div_factor, final_div_factor",
    )
    asha: bool = False
    asha_grace_epochs: int = Field(1, ge=1)

    @field_validator("space")
    @classmethod
    def _space_keys(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for k, vals in v.items():
            if k not in _SPACE_RANGES:
                raise ValueError(f"unknown search key {k!r}; allowed: {', '.join(sorted(_SPACE_RANGES))}")
            if not vals:
                raise ValueError(f"{k}: needs at least one value")
            lo, hi, what = _SPACE_RANGES[k]
            for x in vals:
                if not (x > lo if k != "weight_decay" else x >= lo) or x > hi:
                    raise ValueError(f"{k}: {x} is not {what}")
                if k == "epochs" and x != int(x):
                    raise ValueError(f"epochs: {x} is not a whole number of epochs")
        return v


class DistillCfg(Schedule):
    enabled: bool = True
    teachers: Literal["chain", "all", "topk", "diverse"] = "chain"
    num_teachers: int = Field(6, ge=1, description="topk/diverse: how many teachers")
    temperature: float = Field(5.0, gt=0)
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the hard-label CE term (0 = soft targets only)")
    mode: Literal["online", "cached"] = "online"
    cache_topk: int | None = Field(None, ge=1, description="cached mode: probabilities kept per image; null = every "
                                   "class, the paper's exact loss (6 bytes per class per image per epoch); a smaller k "
                                   "spreads the rest uniformly (bench/topk_gap.py measures the distortion)")
    cache_actors: int = Field(2, ge=1, description="cached mode: Ray actors computing soft labels")
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class KesiCfg(Strict):
    """KESI: iterative pruning with LR-restart branches, then distillation from the snapshot ensemble."""

    name: Literal["kesi"] = "kesi"
    prune: PruneCfg = PruneCfg()
    retrain: Schedule = Schedule()
    fixed_lr: FixedLRCfg = FixedLRCfg()
    tune: TuneCfg = TuneCfg()
    distill: DistillCfg = DistillCfg()

    # Library arguments -> the key the user wrote (see kesi_dist.errors.BadValue).
    ARG_KEYS: ClassVar[dict[str, str]] = {
        "stage_ratios": "method.prune.stage_ratios", "skip": "method.prune.skip",
        "layer_ratios": "method.prune.layer_ratios", "targets": "method.prune.targets",
        "space": "method.tune.space", "branches": "method.tune.branches",
    }

    @model_validator(mode="after")
    def _asha_grace_fits(self) -> "KesiCfg":
        t = self.tune
        epochs = int(max(t.space.get("epochs") or [self.retrain.epochs]))
        if t.asha and t.asha_grace_epochs > epochs:
            raise ValueError(f"tune.asha_grace_epochs: {t.asha_grace_epochs} is more than the {epochs} epoch(s) a "
                             "branch trains (retrain.epochs / tune.space.epochs), so ASHA could never stop one; "
                             "lower it or train longer")
        return self

    def budget(self) -> LatencyBudget | None:
        """`prune.target`'s latency budget; None: the schedule is applied as written."""
        return None if self.prune.target is None else self.prune.target.budget("method.prune.target")

    def check(self, root: Any) -> None:
        """Mistakes visible only next to the model (raises BadValue): pruning names and ratio counts
        that do not fit the architecture, a search space that cannot give the branches."""
        from kesi_dist.methods.kesi.prune import check_schedule, restart_grid

        check_schedule(root.model.arch, self.prune)
        restart_grid(self.tune.space, self.tune.branches, self.tune.search, root.seed)
