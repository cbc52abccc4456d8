"""Parallel training branches as Ray Tune trials: one `run_training` per branch, placed by Tune.

A branch is a model (an init checkpoint), a schedule and a task, trained to a snapshot file. What the
branches mean is the caller's: KESI's LR restarts of a pruned parent and its fixed-LR comparison arm,
EKG's fine-tuning arms. Branches with `compete=True` report the metric ASHA compares; the others (a
comparison arm) are never stopped early. The caller builds the specs (seeded), so a resumed run sees the
same branches and skips those it registered; `on_done` runs the moment a trial completes (a Tune
callback in the driver), so a driver crash loses at most the trials in flight.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from ray.tune import Callback

from kesi_dist import storage
from kesi_dist.runtime.trainer import run_training
from kesi_dist.train.loop import DivergedError
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec, selection_key
from kesi_dist.train.task_specs import ClassificationSpec, TaskSpec

__all__ = ["Branch", "run_branches", "ASHA_METRIC"]

# The metric ASHA compares (the selection split's accuracy, `selection_key`); only competing branches
# report it, so ASHA never stops a comparison arm.
ASHA_METRIC = "branch/select_acc"


@dataclass
class Branch:
    """One training run of a Tune search."""

    name: str  # the snapshot's name, e.g. "iter2_b1"
    arm: str  # what the caller calls this kind of branch, e.g. "onecycle" or "fixed"
    init_checkpoint: str  # the model it starts from
    checkpoint: str  # where the trained snapshot is written
    schedule: dict  # ScheduleSpec fields
    hparams: dict = field(default_factory=dict)  # the searched values of this branch
    compete: bool = True  # reports ASHA_METRIC (False: a comparison arm ASHA never stops)
    task: TaskSpec = field(default_factory=ClassificationSpec)  # what it optimises (`kesi_dist.train.task_specs`)
    meta: dict = field(default_factory=dict)  # the caller's own (iteration, parent, ...), carried along


def _trial(config: dict) -> None:
    """Tune trial function: one branch = one `run_training` (a TorchTrainer when num_workers > 0)."""
    import ray
    from ray import tune


    b = Branch(**config["branch"])
    metric_key = ASHA_METRIC if b.compete else f"{b.arm}/select_acc"
    loader = LoaderSpec(**config["loader"])
    select = selection_key(loader)
    start = time.time()

    epochs = ScheduleSpec(**b.schedule).epochs

    def on_epoch(m: dict) -> None:
        # The last epoch is reported once, with the snapshot (below): ASHA stops a trial whose result
        # reaches its max_t, and a trial stopped on that report would never hand over its snapshot.
        if m["epoch"] + 1 < epochs:
            tune.report({"epoch": m["epoch"] + 1, "select/acc": m[select], "train/loss": m["train/loss"],
                         metric_key: m[select]})

    try:
        result = run_training(
            model=ModelSpec(arch="", init_checkpoint=b.init_checkpoint),
            schedule=ScheduleSpec(**b.schedule),
            loader=loader,
            engine=EngineSpec(**config["engine"]),
            storage_path=config["storage"],
            name=b.name,
            seed=config["seed"],
            resume=True,  # a branch restarted after a driver crash continues from its last epoch
            final_checkpoint=b.checkpoint,
            tensorboard_dir=storage.join(config["tensorboard"], b.name),
            progress_file=storage.join(config["progress"], f"{b.name}.json") if config.get("progress") else None,
            hparams={"arm": b.arm, **b.hparams},
            on_epoch=on_epoch,
            progress=False,
            max_steps_per_epoch=config.get("max_steps_per_epoch"),
            task=b.task,
        )
    except DivergedError as e:
        # The trial's final result, not an error: Tune would retry an error (max_failures), and the
        # same branch would diverge again.
        tune.report({"diverged": str(e), "node_id": ray.get_runtime_context().get_node_id(),
                     "start": start, "end": time.time()})
        return
    tune.report({
        "epoch": result.metrics["epoch"] + 1, "val/acc": result.metrics["val/acc"],
        "select/acc": result.metrics[select], "train/loss": result.metrics["train/loss"],
        "holdout/acc": result.metrics.get("holdout/acc"), metric_key: result.metrics[select],
        "snapshot": b.checkpoint,
        "node_id": result.metrics.get("node_id") or ray.get_runtime_context().get_node_id(),
        "start": start, "end": time.time(), "attempts": result.attempts, "resumed_at": result.resumed_at,
        # When the model trained (a trial may wait for its worker group's resources first).
        "train_start": result.history[0]["time"] - result.history[0]["epoch_s"], "train_end": result.history[-1]["time"],
        "world_size": result.metrics.get("world_size", 1),
    })


def run_branches(
    branches: list[Branch],
    *,
    loader: LoaderSpec,
    engine: EngineSpec,
    storage: str,
    tensorboard: str,
    experiment: str,
    seed: int,
    asha: bool = False,
    asha_grace_epochs: int = 1,
    on_done: Callable[[Branch, dict], None],
    on_failed: Callable[[Branch, str], None],
    on_progress: Callable[[Branch, dict], None] | None = None,
    on_retry: Callable[[Branch, str, int], None] | None = None,
    max_steps_per_epoch: int | None = None,
    progress: str | None = None,
) -> None:
    """Run `branches` as parallel Tune trials; call `on_done(branch, final_result)` as each finishes.

    A trial whose actor is lost (its node died, its process was killed) is restarted up to
    `engine.max_failures` times, possibly on another node, and continues from its last epoch
    checkpoint; `on_retry(branch, why, attempt)` is called each time, and the final result's
    "attempts" counts every start. A trial that still errors (e.g. diverged) is reported through
    `on_failed` and does not stop the others.
    """
    if not branches:
        return
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    driver = _Driver({b.name: b for b in branches}, on_done, on_failed, on_progress, on_retry)

    # The trial function only drives a TorchTrainer, whose workers hold the CPUs/GPUs; in-process
    # training (num_workers == 0) runs inside the trial, which then needs the resources itself.
    if engine.num_workers == 0:
        resources = {"cpu": engine.cpus_per_worker, "gpu": engine.gpus_per_worker}
    else:
        resources = {"cpu": 0, "memory": 1 << 20}  # Tune refuses an empty request; 1 MiB is nothing
    scheduler = None
    if asha:
        max_t = max(b.schedule["epochs"] for b in branches)
        scheduler = ASHAScheduler(metric=ASHA_METRIC, mode="max", time_attr="epoch", max_t=max_t,
                                  grace_period=min(asha_grace_epochs, max_t))
    # Tune's own reporter prints tables and paths between our progress lines; the legacy reporter
    # honours verbose=0, the new one does not.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C and SIGTERM are the driver's (kesi_dist.launch: the stage is marked interrupted, the line
    # says `--resume`); Tune's own SIGINT handler would end the trials and advise `Tuner.restore`.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # A failed trial is reported in one line by _Driver (retried or failed, with its root cause; the
    # traceback stays in the trial's error file); Tune's controller would print the traceback too.
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        param_space={
            # One level deep: the task spec travels as itself (asdict would turn it into a dict).
            "branch": tune.grid_search([{f.name: getattr(b, f.name) for f in fields(b)} for b in branches]),
            "loader": asdict(loader), "engine": asdict(engine), "storage": storage,
            "tensorboard": tensorboard, "seed": seed, "max_steps_per_epoch": max_steps_per_epoch,
            "progress": progress,
        },
        # A finished trial's process runs the next waiting one: its imports (torch, Ray Train) and
        # warm caches are not paid again per branch.
        tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(name=experiment, storage_path=storage, callbacks=[driver], verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=engine.max_failures)),
    )
    tuner.fit()


class _Driver(Callback):
    """Tune callback in the driver: progress lines, and each branch registered as it finishes."""

    def __init__(self, by_name: dict[str, Branch], on_done, on_failed, on_progress, on_retry=None):
        self.by_name, self.on_done, self.on_failed, self.on_progress = by_name, on_done, on_failed, on_progress
        self.on_retry = on_retry
        self.retries: dict[str, int] = {}  # restarts per branch (Tune does not count preempted nodes)

    # Tune pickles callbacks into its experiment state; the handlers (closures over the manifest)
    # only make sense in this driver process, so they are not part of that state.
    def __getstate__(self):
        return {}

    def _branch(self, trial) -> Branch:
        return self.by_name[trial.config["branch"]["name"]]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.on_progress is not None and "epoch" in result and "diverged" not in result:
            self.on_progress(self._branch(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if "snapshot" in last:
            # A trial Tune restarted (lost node) reports only its own last process's starts.
            b = self._branch(trial)
            self.on_done(b, {**last, "attempts": last.get("attempts", 1) + self.retries.get(b.name, 0)})
        elif "diverged" in last:  # reported by the trial, not raised, so that Tune does not retry it
            self.on_failed(self._branch(trial), last["diverged"])
        else:  # stopped early by ASHA: not a finished branch, so not a snapshot
            self.on_failed(self._branch(trial), f"stopped early by ASHA after {last.get('epoch', 0)} epoch(s)")

    def on_trial_recover(self, iteration, trials, trial, **info):
        b = self._branch(trial)
        self.retries[b.name] = self.retries.get(b.name, 0) + 1
        if self.on_retry is not None:
            self.on_retry(b, _trial_error(trial), self.retries[b.name] + 1)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_failed(self._branch(trial), _trial_error(trial))


def _trial_error(trial: Any) -> str:
    """One line saying why a trial failed (the root cause, not Tune's traceback)."""
    text = ""
    try:
        path = trial.error_file
        if path:
            with open(path) as f:
                text = f.read()
    except OSError:
        pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "trial failed (no error recorded)"
