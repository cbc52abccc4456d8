"""What every recipe (and `kesi train`) does first: the data stage and the baseline stage, and the flat
specs the later stages take."""

from __future__ import annotations

from dataclasses import dataclass

from kesi_dist.config import Config, data_spec, engine_spec, loader_spec, num_classes
from kesi_dist.runs import RunContext
from kesi_dist.stages.baseline import baseline_stage
from kesi_dist.stages.data import data_stage
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, schedule_from

__all__ = ["Opening", "open_recipe"]


@dataclass(frozen=True)
class Opening:
    loader: LoaderSpec  # the prepared data, as every training run reads it
    engine: EngineSpec  # where and how every training run executes
    model: ModelSpec  # the baseline's network (its classes are the data's)
    baseline: dict  # the baseline's registry entry (snapshot "baseline")


def open_recipe(cfg: Config, ctx: RunContext) -> Opening:
    """Prepare (or reuse) the data and train (or import, or reuse) the baseline of `cfg` in `ctx`'s run."""
    data_dir, meta = data_stage(ctx, data_spec(cfg), holdout=cfg.data.holdout, holdout_seed=cfg.seed)
    loader, engine = loader_spec(cfg, data_dir), engine_spec(cfg)
    model = ModelSpec(cfg.model.arch, num_classes=num_classes(cfg, meta), options=cfg.model.options())
    entry = baseline_stage(ctx, model=model, schedule=schedule_from(cfg.baseline), loader=loader, engine=engine,
                           seed=cfg.seed, given=cfg.baseline.checkpoint, weights=cfg.model.weights)
    return Opening(loader, engine, model, entry)
