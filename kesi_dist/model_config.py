"""The `model:` and `baseline:` sections of a config, and what only shows next to the data section.

    model: {arch: torchvision:resnet50, weights: s3://bucket/finetuned.pth, resolution: 224}
    baseline: {epochs: 0}      # the weights are the baseline: evaluate them and go on

`model.arch` is a zoo name, "torchvision:<name>" or "timm:<name>"; an unknown name, a missing timm extra
or a network the dependency graph cannot cut is refused in one line while the config is read, before any
cluster starts. `model.weights` is a trained state dict to start from (`kesi_dist.models.weights`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kesi_dist.errors import KesiError
from kesi_dist.schema import Schedule, Strict

__all__ = ["ModelCfg", "BaselineCfg", "resolve_model", "default_num_classes"]

_CLASSES = {"cifar10": 10, "cifar100": 100, "tiny-imagenet": 200, "digits": 10}


class ModelCfg(Strict):
    arch: str = Field("resnet56", description="a zoo network (kesi_dist.models.MODELS), or torchvision:<name> / "
                      "timm:<name>: any torchvision or timm image classifier, pruned through its dependency graph "
                      "(timm needs `pip install 'kesi_dist[timm]'`); an unknown name is refused with suggestions")
    num_classes: int | None = Field(None, ge=2, description="default: taken from the data")
    shortcut: Literal["avgpool", "slice"] | None = Field(
        None, description="CIFAR ResNets' parameter-free downsampling shortcut: avgpool (2x2 average + zero "
        "channels, the reference code's; the default) or slice (every other pixel + zero channels)")
    weights: str | None = Field(None, description="trained weights to start from: a state dict (.pt/.pth, read "
                                "weights-only, or .safetensors; the network's own keys), local or a storage URI; a "
                                "head for another number of classes is replaced and the baseline stage fine-tunes")
    resolution: int | None = Field(None, ge=8, le=1024, description="torchvision/timm networks: the input side they "
                                   "are traced and checked at (saved with every checkpoint); default data.resolution")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from kesi_dist.models import known_arch  # local import: config must load without torch work

        problem = known_arch(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _options_apply(self) -> "ModelCfg":
        from kesi_dist.models import is_source_arch, model_options

        if self.shortcut is not None and "shortcut" not in model_options(self.arch):
            raise ValueError(f"model.shortcut applies to the CIFAR ResNets (resnet20/32/56/110) only; {self.arch} "
                             "has no parameter-free shortcut: remove it")
        if self.resolution is not None and not is_source_arch(self.arch):
            raise ValueError(f"model.resolution applies to torchvision:/timm: networks; {self.arch} is a zoo network "
                             "and sees data.resolution: remove it")
        return self

    def options(self) -> dict:
        """The architecture options to build with (`kesi_dist.models.build_model(**options)`)."""
        options = {} if self.shortcut is None else {"shortcut": self.shortcut}
        return options if self.resolution is None else {**options, "resolution": self.resolution}


class BaselineCfg(Schedule):
    checkpoint: str | None = Field(None, description="a trained baseline checkpoint; skips baseline training")
    epochs: int = Field(300, ge=0, description="0: model.weights (with a head for the data's classes) are the "
                        "baseline, evaluated and pruned as they are")
    schedule: Literal["multistep", "constant", "onecycle"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [150, 225])


def resolve_model(cfg: Any) -> None:
    """Checks across sections (raises ValueError, for pydantic to report): a torchvision/timm network
    is traced at `model.resolution`, by default `data.resolution` (filled in here), and must be
    prunable there; `baseline.epochs: 0` needs weights to be the baseline."""
    from kesi_dist.models import is_source_arch
    from kesi_dist.models.graphnet import check_prunable

    m, b = cfg.model, cfg.baseline
    if m.weights and b.checkpoint:
        raise ValueError("model.weights and baseline.checkpoint both give the baseline: keep one (baseline.checkpoint "
                         "is a kesi_dist checkpoint, model.weights a state dict to start from)")
    if b.epochs == 0 and not (m.weights or b.checkpoint):
        raise ValueError("baseline.epochs: 0 means the given weights are the baseline; set model.weights (or "
                         "baseline.checkpoint), or train the baseline for at least 1 epoch")
    if not is_source_arch(m.arch):
        return
    if m.resolution is None:
        m.resolution = cfg.data.resolution
    try:
        check_prunable(m.arch, m.resolution)
    except KesiError as e:
        raise ValueError(f"model.arch: {e}") from None


def default_num_classes(cfg: Any) -> int:
    """`model.num_classes` if set, else what the root config's data source has (10 when it cannot be known
    before the data is read)."""
    if cfg.model.num_classes:
        return cfg.model.num_classes
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic.num_classes
    return _CLASSES.get(cfg.data.source, 10)
