"""Experiment configuration: one pydantic object flows from the CLI to every stage.

YAML is read with `yaml.safe_load`; `--set dotted.key=value` overrides are applied to the raw mapping
before validation, so an override is checked exactly like a value in the file. Every error names the
file, the dotted key and what is allowed, and is raised as `UsageError` (exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kesi_dist.errors import UsageError

__all__ = [
    "Config",
    "ModelCfg",
    "DataCfg",
    "PruneCfg",
    "Schedule",
    "BaselineCfg",
    "FixedLRCfg",
    "TuneCfg",
    "DistillCfg",
    "TrainCfg",
    "ClusterCfg",
    "load_config",
    "apply_overrides",
    "config_to_yaml",
]

SOURCES = ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "digits", "synthetic", "prepared")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Strict):
    arch: str = Field("resnet56", description="model name from the zoo (`kesi plan --list` shows them)")
    num_classes: int | None = Field(None, ge=2, description="default: taken from the data")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from kesi_dist.models import MODELS  # local import: config must load without torch work

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; choose one of {', '.join(sorted(MODELS))}")
        return v


class SyntheticCfg(_Strict):
    num_train: int = Field(2000, ge=1)
    num_val: int = Field(500, ge=1)
    num_classes: int = Field(10, ge=2)
    difficulty: float = Field(0.5, ge=0.0, le=1.0, description="0 = trivially separable, 1 = hard")


class DataCfg(_Strict):
    source: Literal["cifar10", "cifar100", "tiny-imagenet", "imagefolder", "digits", "synthetic", "prepared"] = "digits"
    root: str | None = Field(None, description="raw source folder (torchvision layout); unused for digits/synthetic")
    prepared: str | None = Field(None, description="folder with train.beton, val.beton, meta.json; default <run>/data")
    resolution: int = Field(32, ge=8, le=1024, description="image side the model sees")
    store_resolution: int | None = Field(None, ge=8, description="side stored in .beton (default: source's own)")
    augment: Literal["cifar", "imagenet", "none"] = "cifar"
    loader: Literal["ffcv", "torch"] = "ffcv"
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(2, ge=0, description="loader threads/processes per training worker")
    synthetic: SyntheticCfg = SyntheticCfg()

    @model_validator(mode="after")
    def _root_needed(self) -> "DataCfg":
        if self.source in ("cifar10", "cifar100", "tiny-imagenet", "imagefolder") and not self.root:
            raise ValueError(f"data.root is required for source {self.source!r} (the folder torchvision would take)")
        if self.source == "prepared" and not self.prepared:
            raise ValueError("data.prepared is required for source 'prepared' (folder with train.beton, val.beton)")
        return self


class Schedule(_Strict):
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


class BaselineCfg(Schedule):
    checkpoint: str | None = Field(None, description="a trained baseline checkpoint; skips baseline training")
    epochs: int = Field(300, ge=1)
    schedule: Literal["multistep", "constant", "onecycle"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [150, 225])


class PruneCfg(_Strict):
    method: Literal["pfec", "mwp"] = "pfec"
    iterations: int = Field(5, ge=1, le=50)
    stage_ratios: list[float] = Field(
        default_factory=lambda: [0.1, 0.2, 0.3],
        description="pfec: fraction of filters removed per iteration in each stage (compounds)",
    )
    skip: list[str] = Field(default_factory=list, description="pfec: units never pruned (e.g. layer1.7)")
    layer_ratios: dict[str, float] = Field(default_factory=dict, description="pfec: per-unit ratio overrides")
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


class TuneCfg(_Strict):
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
        allowed = {"lr", "pct_start", "epochs", "div_factor", "final_div_factor", "weight_decay"}
        for k, vals in v.items():
            if k not in allowed:
                raise ValueError(f"unknown search key {k!r}; allowed: {', '.join(sorted(allowed))}")
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
    cache_topk: int = Field(10, ge=1, description="cached mode: logits kept per image")
    cache_actors: int = Field(2, ge=1, description="cached mode: Ray actors computing soft labels")
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class TrainCfg(_Strict):
    """Where and how every training run executes (placement and engine, not hyper-parameters)."""

    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(0, ge=0, le=2)
    num_workers: int = Field(1, ge=0, description="Ray Train workers per run; 0 = in-process, no Ray")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="fractions allowed, e.g. 0.5 to share a GPU")
    bf16: bool = Field(True, description="bf16 autocast; only takes effect on CUDA")
    channels_last: bool = Field(True, description="only takes effect on CUDA")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")


class ClusterCfg(_Strict):
    address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS, else a local Ray")
    storage: str | None = Field(None, description="shared storage URI for multi-node runs (s3://, gs://, file://)")


class Config(_Strict):
    """A whole experiment."""

    seed: int = 0
    output: str | None = Field(None, description="run directory or storage URI; --output overrides")
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    baseline: BaselineCfg = BaselineCfg()
    prune: PruneCfg = PruneCfg()
    retrain: Schedule = Schedule()
    fixed_lr: FixedLRCfg = FixedLRCfg()
    tune: TuneCfg = TuneCfg()
    distill: DistillCfg = DistillCfg()
    train: TrainCfg = TrainCfg()
    cluster: ClusterCfg = ClusterCfg()

    @model_validator(mode="after")
    def _asha_grace_fits(self) -> "Config":
        t = self.tune
        epochs = int(max(t.space.get("epochs") or [self.retrain.epochs]))
        if t.asha and t.asha_grace_epochs > epochs:
            raise ValueError(f"tune.asha_grace_epochs: {t.asha_grace_epochs} is more than the {epochs} epoch(s) a "
                             "branch trains (retrain.epochs / tune.space.epochs), so ASHA could never stop one; "
                             "lower it or train longer")
        return self


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists (`3`, `0.1`, `[1, 2]`, `true`), read with safe_load."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply `dotted.key=value` overrides to a raw mapping (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"{source} {item!r}: expected dotted.key=value, e.g. prune.iterations=3")
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UsageError(f"{source} {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_error(origin: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `kesi config` prints every key with its default)"
    elif first["type"] == "literal_error":
        msg = f"{msg}, got {first.get('input')!r}"
    elif "input" in first and first["type"] not in ("value_error", "missing") and not isinstance(first["input"], dict):
        msg = f"{msg}, got {first['input']!r}"
    where = f"{loc}: " if loc else ""
    return f"{origin}: {where}{msg}"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or defaults when `path` is None), apply overrides, validate."""
    origin = str(path) if path else "<defaults>"
    raw: Any = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{origin}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise UsageError(f"{origin}: malformed YAML{where}: {problem}") from None
        if not isinstance(raw, dict):
            raise UsageError(f"{origin}: expected a mapping of sections (model:, data:, ...), got {type(raw).__name__}")
    apply_overrides(raw, overrides or [])
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UsageError(_format_error(origin, e)) from None


def config_to_yaml(cfg: Config) -> str:
    """The resolved config, as saved into a run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
