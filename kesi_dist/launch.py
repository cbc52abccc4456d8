"""Starting a run: what `kesi run` and `kesi train` do before and around a method's recipe.

    preflight  mistakes visible from the config (a given baseline of another model), before Ray starts
    cluster    connect Ray; the cluster can fit one training run and its GPUs work; a local --output is
               seen by every node
    run folder create it, or reopen it for --resume (refusing another config), as a RunContext
    recipe     the method's `run(cfg, ctx)`; a failure marks the run failed and is re-raised

Everything before the run folder exists fails in seconds and leaves nothing to clean up.
"""

from __future__ import annotations

from kesi_dist.config import Config
from kesi_dist.errors import KesiError, RunError, UsageError
from kesi_dist.methods import METHODS
from kesi_dist.runs import RunContext, fmt_acc, fmt_size, open_run

__all__ = ["run_method", "train_baseline", "open_context"]


def _preflight(cfg: Config) -> None:
    if cfg.model.weights:  # read and checked against the network (and the data's classes) before Ray starts
        _check_weights(cfg, None)
    path = cfg.baseline.checkpoint
    if not path:
        return
    from kesi_dist.checkpoint import load_checkpoint

    try:
        ck = load_checkpoint(path)
    except RunError as e:
        raise RunError(f"baseline.checkpoint: {e}") from None
    if ck["arch"] != cfg.model.arch:
        raise UsageError(f"baseline.checkpoint {path}: holds a {ck['arch']}, but model.arch is {cfg.model.arch}")
    if cfg.model.num_classes and ck["num_classes"] != cfg.model.num_classes:
        raise UsageError(f"baseline.checkpoint {path}: has {ck['num_classes']} classes, but model.num_classes "
                         f"is {cfg.model.num_classes}")


def _check_weights(cfg: Config, meta: dict | None) -> None:
    from kesi_dist.config import num_classes
    from kesi_dist.plan import default_num_classes
    from kesi_dist.stages.baseline import load_weights
    from kesi_dist.train.spec import ModelSpec

    known = meta is not None or bool(cfg.model.num_classes) or cfg.data.source != "imagefolder"
    classes = num_classes(cfg, meta) if meta else default_num_classes(cfg)
    load_weights(cfg.model.weights, ModelSpec(cfg.model.arch, classes, options=cfg.model.options()),
                 as_is=known and cfg.baseline.epochs == 0)


def open_context(cfg: Config, output: str, resume: bool, *, title: str, use_ray: bool = True,
                 max_steps: int | None = None) -> RunContext:
    """Checks, then the run folder and its context. `use_ray=False`: everything runs in this process
    (`kesi train` with `train.num_workers: 0`), so no Ray is started."""
    _preflight(cfg)
    shared_with = []
    if use_ray:
        from kesi_dist.runtime import check_gpus, check_resources, check_shared_path, connect_ray

        connect_ray(cfg.cluster.address)
        t = cfg.train
        workers = max(t.num_workers, 1)  # num_workers == 0: a branch trial holds one worker's resources
        check_resources(workers * t.gpus_per_worker, workers * t.cpus_per_worker)
        check_gpus(t.gpus_per_worker)  # a GPU Ray advertises but CUDA cannot use: stop before anything runs
        shared_with = check_shared_path(output)
    run, manifest = open_run(output, cfg.model_dump(mode="json"), resume)
    ctx = RunContext(run, manifest, resolution=cfg.data.resolution, max_steps=max_steps)
    ctx.console.rule(f"{title} · {run.root}")
    if shared_with:
        ctx.print(f"output {output}: visible from all {len(shared_with)} other node(s) with CPUs/GPUs")
    return ctx


def run_method(cfg: Config, output: str, resume: bool = False, *, max_steps: int | None = None) -> RunContext:
    """`kesi run`: the whole pipeline of `cfg.method` into `output` (a folder or storage URI)."""
    method = METHODS[cfg.method.name]
    title = f"kesi run · {method.name} · {method.module('report').layout(cfg).title}"
    ctx = open_context(cfg, output, resume, title=title, max_steps=max_steps)
    try:
        method.module("recipe").run(cfg, ctx)
    except KesiError as e:
        ctx.fail(str(e))
        raise
    ctx.print(f"[green]done[/]: report in {ctx.run.path('report.md')}")
    return ctx


def train_baseline(cfg: Config, output: str, resume: bool = False) -> dict:
    """`kesi train`: the data and baseline stages of a run into `output`; returns the baseline's entry.

    The folder is a run folder like `kesi run`'s (a later `kesi run --resume` of the same config reuses
    the baseline); the baseline is `<output>/snapshots/baseline.pt`.
    """
    from kesi_dist.config import data_spec, engine_spec, loader_spec, num_classes
    from kesi_dist.stages.baseline import baseline_stage
    from kesi_dist.stages.data import data_stage
    from kesi_dist.train.spec import ModelSpec, schedule_from

    ctx = open_context(cfg, output, resume, title=f"kesi train · {cfg.model.arch}",
                       use_ray=cfg.train.num_workers > 0)
    try:
        data_dir, meta = data_stage(ctx, data_spec(cfg), holdout=cfg.data.holdout, holdout_seed=cfg.seed)
        entry = baseline_stage(ctx, model=ModelSpec(cfg.model.arch, num_classes=num_classes(cfg, meta),
                                                               options=cfg.model.options()),
                               schedule=schedule_from(cfg.baseline), loader=loader_spec(cfg, data_dir),
                               engine=engine_spec(cfg), seed=cfg.seed, given=cfg.baseline.checkpoint,
                               weights=cfg.model.weights)
    except KesiError as e:
        ctx.fail(str(e))
        raise
    ctx.complete()
    ctx.print(f"baseline: {fmt_acc(entry)}, {fmt_size(entry)} -> {ctx.snapshot('baseline')}")
    return entry
