"""Places one training run on a Ray Train worker group (Train V2 `TorchTrainer`), or in this process.

`run_training` is the one entry point. Workers (`kesi_dist.runtime.worker.train_worker`) build model,
task, loaders, optimizer and schedule themselves from plain specs, wrap the model with DDP (gloo on CPU,
nccl on CUDA) or DeepSpeed, and every epoch report metrics plus a checkpoint. After a worker failure Ray
restarts the group (`FailureConfig`) from the last reported epoch; the epoch in flight is redone.
`num_workers=0` runs the same worker function here, without Ray (`LocalSession`), with the same
checkpoint layout, so `resume=True` works there too.

Rank 0 sends an event per epoch to the driver (a Ray queue; a direct call in-process). The driver, the
process that called `run_training` (a CLI, a Tune trial), prints one line per epoch, writes TensorBoard
(one writer per run) and hands each epoch to `on_epoch`, e.g. `tune.report` in a Tune trial.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from rich.console import Console

from kesi_dist import storage
from kesi_dist.errors import RunError, UsageError
from kesi_dist.progress import bar
from kesi_dist.runtime.remote import driver_queue as _driver_queue
from kesi_dist.runtime.remote import pump as _pump
from kesi_dist.runtime.sessions import CHECKPOINTS_KEPT, LocalSession
from kesi_dist.runtime.worker import train_worker
from kesi_dist.train.loop import DivergedError
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec
from kesi_dist.train.task_specs import ClassificationSpec, TaskSpec
from kesi_dist.train.tensorboard import ScalarWriter

__all__ = ["TrainResult", "run_training"]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        metrics: the last epoch's metrics (epoch, train/*, val/* (the test split), holdout/* (the
            selection split, with a holdout), lr, images_per_s, epoch_s; time.time() stamps of rank 0:
            worker_start_time, epoch_start_time, train_end_time, time (evaluated), and, on epochs this
            driver saw complete, checkpoint_end_time (the epoch's checkpoint written and reported)).
        history: every completed epoch's metrics, in order, as rank 0 recorded them (restored from
            the checkpoint after a restart, so it lists each epoch once).
        started: the epoch numbers the workers started, in order, across restarts (a failure shows as
            one epoch started twice).
        attempts: how many times the worker group (re)started.
        resumed_at: the first epoch of every attempt (0, or the epoch after the checkpoint it restored).
        checkpoint: path of the final model in kesi_dist checkpoint format (`final_checkpoint`), or
            None when not asked for.
        run_dir: the run folder in storage (Ray's checkpoints live under it).
    """

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    started: list[int] = field(default_factory=list)
    attempts: int = 1
    resumed_at: list[int] = field(default_factory=list)
    checkpoint: str | None = None
    run_dir: str = ""


def _fmt(m: dict, epochs: int, name: str) -> str:
    evals = "".join(f"  {split} loss {m[f'{split}/loss']:.4f}  {split} acc {100 * m[f'{split}/acc']:.1f}%"
                    for split in ("holdout", "val") if f"{split}/acc" in m)
    return (f"[bold]{name}[/] epoch {m['epoch'] + 1}/{epochs}  loss {m['train/loss']:.4f}  "
            f"acc {100 * m['train/acc']:.1f}%{evals}  "
            f"lr {m['lr']:.4g}  {m['images_per_s']:.0f} img/s  {m['epoch_s']:.1f}s")


def _failure_message(err: BaseException) -> tuple[type[Exception], str]:
    """The root cause of a Ray Train failure, as (error class, one line)."""
    failures = getattr(err, "worker_failures", None) or {}
    causes = list(failures.values()) or [getattr(err, "controller_failure", None) or err]
    # A Ray task's error wraps the exception its code raised (`.cause`): that one is the user's line.
    causes = [c.cause if isinstance(getattr(c, "cause", None), BaseException) else c for c in causes]
    for cause in causes:
        text = str(cause)
        if isinstance(cause, DivergedError) or "DivergedError" in text:
            line = next((ln for ln in text.splitlines() if "training diverged" in ln), text.splitlines()[-1])
            return DivergedError, line.split("DivergedError: ")[-1].strip()
    for cause in causes:
        if isinstance(cause, (UsageError, RunError)):
            return type(cause), str(cause)
    lines = [ln.strip() for ln in str(causes[0]).splitlines() if ln.strip()]
    return RunError, lines[-1] if lines else type(causes[0]).__name__


def run_training(
    *,
    model: ModelSpec,
    schedule: ScheduleSpec,
    loader: LoaderSpec,
    engine: EngineSpec = EngineSpec(),
    storage_path: str,
    name: str,
    seed: int = 0,
    resume: bool = False,
    final_checkpoint: str | None = None,
    tensorboard_dir: str | None = None,
    hparams: dict[str, Any] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
    max_steps_per_epoch: int | None = None,
    inject_failure_at_epoch: int | None = None,
    task: TaskSpec = ClassificationSpec(),
    progress_file: str | None = None,
) -> TrainResult:
    """Train one model on a Ray Train worker group (or in-process when engine.num_workers == 0).

    Args:
        model, schedule, loader, engine: what to train, how, on what data, where (see their docs).
        task: what each step optimises (`kesi_dist.train.task_specs`; default: classification;
            `DistillationSpec(T, teachers=...)` runs the frozen teachers on each worker's shard of every
            batch, `soft_labels=<cache folder>` reads them by (epoch, sample index) instead).
        storage_path: local absolute path or pyarrow URI (s3://, gs://, ...); the run lives in
            `<storage_path>/<name>`. Ray must already be initialised (`ray.init`) for num_workers > 0.
        name: the run's name (unique per model / Tune trial).
        resume: continue from the last epoch checkpoint in storage; without it an existing run folder
            of the same name is deleted first, so stale checkpoints are never picked up.
        final_checkpoint: where to copy the final model (kesi_dist checkpoint format), if anywhere.
        tensorboard_dir: TensorBoard folder for this run (scalars per epoch; hparams at the end if
            `hparams` is given, e.g. by a Tune trial).
        on_epoch: called in the calling thread with each completed epoch's metrics (e.g. tune.report).
        progress: print one rich line per epoch.
        max_steps_per_epoch: cap on batches per epoch (quick runs, benchmarks).
        inject_failure_at_epoch: TEST ONLY, see `kesi_dist.runtime.worker`.
        progress_file: a small JSON file (local or URI) rewritten after every epoch with where the run is:
            name, epoch, epochs, the last metrics, node, epoch times (what `kesi status` reads).

    Raises:
        DivergedError: the loss became NaN/inf (no checkpoint of that epoch was written).
        RunError / UsageError: the run failed; the message is the workers' root cause.
    """
    if engine.num_workers < 0:
        raise UsageError(f"train.num_workers must be >= 0, got {engine.num_workers}")
    if loader.batch_size % max(1, engine.num_workers):
        raise UsageError(f"data.batch_size {loader.batch_size} is not divisible by train.num_workers "
                         f"{engine.num_workers}; the batch size is global and split evenly over workers")
    run_uri = storage.join(storage_path if storage.is_uri(storage_path) else os.path.abspath(storage_path), name)
    if not resume:
        storage.remove_dir(run_uri)
    config = {
        "model": asdict(model), "schedule": asdict(schedule), "loader": asdict(loader), "engine": asdict(engine),
        "task": task,
        "run": {"seed": seed, "run_dir": run_uri, "max_steps_per_epoch": max_steps_per_epoch,
                "inject_failure_at_epoch": inject_failure_at_epoch, "events": None},
    }



    console = Console(stderr=True, highlight=False)
    live = contextlib.ExitStack()
    within = live.enter_context(bar(console, name, None, unit="step")) if progress else None
    history: list[dict] = []
    started: list[int] = []
    resumed_at: list[int] = []
    attempts = 0
    writer = ScalarWriter(tensorboard_dir)

    def handle(event: dict) -> None:
        nonlocal attempts, history
        kind = event["event"]
        if kind == "attempt":
            attempts += 1
            history = list(event["history"])
            start = event["start_epoch"]
            resumed_at.append(start)
            if attempts > 1 and progress:
                console.print(f"[yellow]{name}: worker group restarted, resuming at epoch {start + 1}")
            elif start > 0 and progress:  # an earlier process (a killed driver) left epoch checkpoints
                console.print(f"{name}: resuming at epoch {start + 1} from its epoch-{start} checkpoint")
        elif kind == "epoch_start":
            started.append(event["epoch"])
            if within is not None:
                within.update(completed=0, total=event.get("steps"),
                              description=f"{name} epoch {event['epoch'] + 1}/{schedule.epochs}")
        elif kind == "tick":
            if within is not None:
                within.update(completed=event["step"])
        elif kind == "steps":  # the LR and momentum of every optimizer step of an epoch
            for i, (lr, momentum) in enumerate(zip(event["lr"], event["momentum"])):
                writer.scalars({"step/lr": lr, "step/momentum": momentum}, step=event["first"] + i, flush=False)
            writer.flush()
        elif kind == "epoch":
            m = event["metrics"]
            history.append(m)
            if progress_file:
                _write_progress(progress_file, name, schedule.epochs, history, attempts)
            writer.scalars({k: v for k, v in m.items() if k.startswith(("train/", "val/", "holdout/"))
                            or k in ("lr", "images_per_s", "epoch_s")}, step=m["epoch"] + 1)
            if progress:
                console.print(_fmt(m, schedule.epochs, name), soft_wrap=True)
            if on_epoch is not None:
                on_epoch(m)

    try:
        if engine.num_workers == 0 and (_in_ray_worker() or not _ray_up()):
            last = _run_local(config, run_uri, handle)  # already placed (a Tune trial), or no Ray at all
        elif engine.num_workers == 0:
            last = _run_placed(config, engine, run_uri, name, handle)
        else:
            last = _run_ray(config, engine, storage_path, name, handle)
        if not history:
            raise RunError(f"run {name!r}: no epoch completed (is schedule.epochs already reached?)")
        final = None
        if final_checkpoint:
            final = _export_final(last, final_checkpoint)
        if hparams:
            writer.hparams(hparams, {k: history[-1][k] for k in ("val/acc", "val/loss", "train/loss", "holdout/acc")
                                     if k in history[-1]})
    finally:
        live.close()
        writer.close()
    return TrainResult(metrics=history[-1], history=history, started=started, attempts=attempts,
                       resumed_at=resumed_at, checkpoint=final, run_dir=run_uri)


def _write_progress(path: str, name: str, epochs: int, history: list[dict], attempts: int) -> None:
    m = history[-1]
    keep = ("train/loss", "train/acc", "holdout/acc", "val/acc", "epoch_s", "node_id", "world_size", "time")
    doc = {"name": name, "epoch": m["epoch"] + 1, "epochs": epochs, "attempts": attempts, "updated": time.time(),
           "metrics": {k: m[k] for k in keep if k in m},
           "epoch_times": [h["time"] for h in history if "time" in h]}
    try:
        storage.write_text(path, json.dumps(doc))
    except (OSError, RunError):  # progress is for watching; a failed write must not fail the training
        pass


def _run_local(config: dict, run_uri: str, handle: Callable[[dict], None]):
    """In this process. Returns (None, path) of the last checkpoint folder, or None."""
    session = LocalSession(run_uri, handle)
    train_worker(config, session)
    last = session.last_checkpoint()
    return (None, last) if last else None


def _train_placed(config: dict, run_uri: str) -> str | None:
    """A Ray task's body: the in-process worker, its events sent to the driver's queue."""
    session = LocalSession(run_uri, config["run"]["events"].put)
    train_worker(config, session)
    return session.last_checkpoint()


def _ray_up() -> bool:
    import ray

    return ray.is_initialized()


def _in_ray_worker() -> bool:
    """True inside a Ray worker process (a Tune trial, a task): placed already, with its resources."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _backend(engine: EngineSpec) -> str:
    """nccl on GPUs, gloo on CPU. NCCL refuses two ranks on one GPU, so a group whose workers hold
    fractions of GPUs (and may share one) uses gloo; fractional GPUs are mainly for single-worker
    Tune trials sharing a GPU, which never communicate anyway."""
    if engine.gpus_per_worker <= 0:
        return "gloo"
    return "nccl" if engine.gpus_per_worker >= 1 or engine.num_workers == 1 else "gloo"


def _run_placed(config: dict, engine: EngineSpec, run_uri: str, name: str, handle):
    """num_workers == 0 from the driver: one Ray task holding one worker's CPUs/GPUs (so a GPU-less head
    never trains), retried from its last epoch checkpoint if its node dies. Returns (None, path)."""
    import ray
    from ray.exceptions import RayError

    events = config["run"]["events"] = _driver_queue()
    task = ray.remote(_train_placed).options(
        num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker, max_retries=engine.max_failures,
        retry_exceptions=False, runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    ref = task.remote(config, run_uri)
    try:
        last = _pump(events, lambda: ray.get(ref), handle, name)
    except RayError as e:
        cls, line = _failure_message(e)
        raise cls(f"training run {name!r} failed: {line}") from None
    return (None, last) if last else None


def _run_ray(config: dict, engine: EngineSpec, storage_path: str, name: str, handle):
    """Returns (filesystem, path) of the last checkpoint directory, or None."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        raise RunError("Ray is not initialised: call ray.init (or kesi_dist.runtime.connect_ray) before "
                       "run_training with train.num_workers > 0")
    use_gpu = engine.gpus_per_worker > 0
    config["run"]["events"] = events = _driver_queue()
    resources = {"CPU": engine.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = engine.gpus_per_worker
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "PYTHONUNBUFFERED": "1"}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend=_backend(engine)),
        scaling_config=ScalingConfig(num_workers=engine.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=engine.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        result = _pump(events, trainer.fit, handle, name)
    except Exception as e:  # noqa: BLE001 - Ray Train's errors carry the workers' causes
        cls, line = _failure_message(e)
        raise cls(f"training run {name!r} failed: {line}") from None
    ckpt = result.checkpoint
    return (ckpt.filesystem, ckpt.path) if ckpt is not None else None


def _export_final(last, dest: str) -> str:
    """Copy `model.pt` of the last checkpoint folder to `dest` (local path or URI), atomically."""
    if not last:
        raise RunError("no checkpoint was reported; nothing to export")
    src_fs, src = last
    storage.copy_file(storage.join(src, "model.pt") if src_fs is None else f"{src}/model.pt", dest, src_fs=src_fs)
    return dest
