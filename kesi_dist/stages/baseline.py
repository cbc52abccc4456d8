"""The baseline stage: train the unpruned model (or take a given checkpoint) and register it.

With trained weights (`model.weights`, a state dict) the model starts from them: they are loaded into
the built network and saved as snapshot file "baseline_init"; with a head for the data's classes and 0
epochs they are the baseline as they are (evaluated, not trained), otherwise the baseline is fine-tuned
from them (a head for other classes is replaced, so it must be trained: 0 epochs is refused then).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from kesi_dist import storage
from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from kesi_dist.data.loaders import make_loader
from kesi_dist.errors import UsageError
from kesi_dist.models import build_model
from kesi_dist.models.weights import load_source_weights
from kesi_dist.runs import RunContext, fmt_acc, fmt_size
from kesi_dist.runtime import run_training
from kesi_dist.train.loop import evaluate
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec

__all__ = ["baseline_stage", "evaluate_snapshot", "load_weights"]


def baseline_stage(ctx: RunContext, *, model: ModelSpec, schedule: ScheduleSpec, loader: LoaderSpec,
                   engine: EngineSpec, seed: int, given: str | None = None, weights: str | None = None) -> dict:
    """Train `model` with `schedule` into snapshot "baseline" (or copy the checkpoint `given`, after
    checking it is that model; or start from the state dict `weights`, see the module docstring);
    returns its registry entry."""
    with ctx.stage("baseline") as st:
        if st.done:
            return ctx.manifest.snapshots["baseline"]
        start = time.time()
        if weights:
            init = _from_weights(ctx, weights, model, seed, as_is=schedule.epochs == 0)
            model = dataclasses.replace(model, init_checkpoint=init)
        if given or (weights and schedule.epochs == 0):
            if given:
                _import(ctx, given, model)
            else:
                storage.copy_file(model.init_checkpoint, ctx.snapshot("baseline"))
            path = ctx.snapshot("baseline")
            val_acc, node_id, attempts, workers, resumed_at = evaluate_snapshot(path, loader), None, 0, 0, []
            holdout_acc = evaluate_snapshot(path, loader, "holdout") if loader.holdout else None
        else:
            ctx.print(f"[bold]baseline[/]: {'fine-tuning' if weights else 'training'} {model.arch} for "
                      f"{schedule.epochs} epochs on {max(engine.num_workers, 1)} worker(s)")
            result = run_training(
                model=model, schedule=schedule, loader=loader, engine=engine, storage_path=ctx.run.train,
                name="baseline", seed=seed, resume=True, final_checkpoint=ctx.snapshot("baseline"),
                tensorboard_dir=ctx.run.path("tensorboard", "baseline"), max_steps_per_epoch=ctx.max_steps,
                progress_file=ctx.progress_file("baseline"),
            )
            val_acc, node_id, attempts = result.metrics["val/acc"], result.metrics.get("node_id"), result.attempts
            holdout_acc, workers = result.metrics.get("holdout/acc"), result.metrics.get("world_size", 1)
            resumed_at = result.resumed_at
        entry = ctx.register("baseline", arm="baseline", iteration=0, branch=None, parent=None, hparams={},
                             node_id=node_id, start=start, end=time.time(), attempts=attempts, resumed_at=resumed_at,
                             val_acc=val_acc,
                             holdout_acc=holdout_acc, workers=workers)
        ctx.print(f"  baseline: {fmt_acc(entry)}, {fmt_size(entry)}")
    return entry


def _import(ctx: RunContext, path: str, model: ModelSpec) -> None:
    """Use a given trained baseline: check it is the configured model, copy it into the run."""
    ck = load_checkpoint(path)
    if ck["arch"] != model.arch:
        raise UsageError(f"baseline.checkpoint {path}: holds a {ck['arch']}, but model.arch is {model.arch}")
    if ck["num_classes"] != model.num_classes:
        raise UsageError(f"baseline.checkpoint {path}: has {ck['num_classes']} classes, the data has "
                         f"{model.num_classes}")
    ctx.print(f"[bold]baseline[/]: using {path}")
    storage.copy_file(path, ctx.snapshot("baseline"))  # either may be a URI; atomic at the destination


def load_weights(weights: str, model: ModelSpec, seed: int = 0, as_is: bool = False):
    """(`model` built with `weights` loaded, the `LoadReport`); a head for other classes is initialised
    with `seed`. `as_is`: the weights must be the baseline as they are, so a replaced head is refused."""
    torch.manual_seed(seed)
    net = build_model(model.arch, model.num_classes, **model.options)
    report = load_source_weights(net, weights)
    if report.head_replaced and as_is:
        raise UsageError(f"model.weights {weights}: its head is for {report.file_classes} classes, the data has "
                         f"{model.num_classes}: the new head must be trained; set baseline.epochs >= 1")
    return net, report


def _from_weights(ctx: RunContext, weights: str, model: ModelSpec, seed: int, as_is: bool) -> str:
    """The model with `weights` loaded, as snapshot file "baseline_init" (once); its path."""
    path = ctx.snapshot("baseline_init")
    net, report = load_weights(weights, model, seed, as_is)
    ctx.print(f"[bold]baseline[/]: {report.message}")
    if not storage.exists(path):  # written atomically: present means complete
        save_checkpoint(path, net, extra={"weights": str(weights), "head_replaced": report.head_replaced})
    return path


def evaluate_snapshot(path: str, loader: LoaderSpec, split: str = "val") -> float:
    """Accuracy of a snapshot file on `split` ("val": the test split; "holdout"), in this process, on the CPU."""
    model, _ = model_from_checkpoint(load_checkpoint(path))
    data = make_loader(loader.data_dir, split, batch_size=loader.batch_size, resolution=loader.resolution,
                       augment=loader.augment, backend=loader.backend, num_workers=loader.num_workers,
                       **loader.split_args)
    return float(evaluate(model, data, "cpu")["val/acc"])
