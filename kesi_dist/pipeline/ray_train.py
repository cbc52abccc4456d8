"""Places the plain-PyTorch training core on a Ray Train worker group (Train V2 `TorchTrainer`).

`run_training` is the one entry point. Every worker input travels in `train_loop_config` (plain dicts
of the specs in `kesi_dist.train.spec`); workers build model, loaders, optimizer and schedule themselves,
wrap the model with DDP (gloo on CPU, nccl on CUDA) or DeepSpeed, and every epoch report metrics plus
a checkpoint with `ray.train.report`. After a worker failure Ray restarts the group (`FailureConfig`)
and `ray.train.get_checkpoint()` resumes from the last reported epoch; the epoch in flight is redone.

A checkpoint directory holds `model.pt` (kesi_dist checkpoint format: arch, widths, state_dict, masks,
metrics), `train_state.pt` (epoch, scheduler, per-epoch history) and the optimizer state
(`optimizer.pt`, or one `optimizer_rank{r}.pt` per rank under DeepSpeed ZeRO).

`num_workers=0` runs the same worker function in this process without Ray (checkpoints go to the same
storage layout, so `resume=True` works there too).

Rank 0 sends an event per epoch to the driver (a Ray queue; a direct call in local mode). The driver,
i.e. the process that called `run_training` (a CLI, or a Ray Tune trial function), prints one line per
epoch, writes TensorBoard (one writer per run, so the log folder only needs to exist where the driver
runs) and hands each epoch to `on_epoch`, e.g. `tune.report` in a Tune trial.

Fault injection for tests: `inject_failure_at_epoch=k` makes rank 1 (rank 0 with a single worker) raise
`InjectedFailure` halfway through epoch k, once: a marker file in the run's storage folder records
that it fired. It is a keyword argument of `run_training` only (no config key, no environment
variable), so it cannot be switched on by accident.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from kesi_dist.errors import RunError, UsageError
from kesi_dist.storage import storage_fs  # re-exported: it lived here first
from kesi_dist.train.loop import DivergedError
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec

__all__ = ["TrainResult", "InjectedFailure", "run_training", "train_worker", "storage_fs"]

CHECKPOINTS_KEPT = 2


class InjectedFailure(RuntimeError):
    """Raised by the test-only fault injection (see module docstring)."""


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        metrics: the last epoch's metrics (epoch, train/*, val/*, lr, images_per_s, epoch_s).
        history: every completed epoch's metrics, in order, as rank 0 recorded them (restored from
            the checkpoint after a restart, so it lists each epoch once).
        started: the epoch numbers the workers started, in order, across restarts (a failure shows as
            one epoch started twice).
        attempts: how many times the worker group (re)started.
        checkpoint: path of the final model in kesi_dist checkpoint format (`final_checkpoint`), or
            None when not asked for.
        run_dir: the run folder in storage (Ray's checkpoints live under it).
    """

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    started: list[int] = field(default_factory=list)
    attempts: int = 1
    checkpoint: str | None = None
    run_dir: str = ""


# ----------------------------------------------------------------------------------------------
# storage helpers (local path or pyarrow filesystem URI)

def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _fetch(uri: str, dst_dir: str) -> str:
    """A local path for `uri` (downloaded into dst_dir when it is remote)."""
    if "://" not in uri:
        return uri
    import pyarrow.fs as pafs

    fs, p = storage_fs(uri)
    local = os.path.join(dst_dir, os.path.basename(p))
    pafs.copy_files(p, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


# ----------------------------------------------------------------------------------------------
# sessions: how a worker reports (Ray Train, or in-process)

class _RaySession:
    def __init__(self, events):
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.events = events

    def get_checkpoint_dir(self, stack) -> str | None:
        ckpt = self._train.get_checkpoint()
        return stack.enter_context(ckpt.as_directory()) if ckpt else None

    def report(self, metrics: dict, directory: str | None) -> None:
        from ray.train import Checkpoint

        self._train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if directory else None)

    def emit(self, event: dict) -> None:
        if self.rank == 0 and self.events is not None:
            self.events.put(event)


class _LocalSession:
    """num_workers == 0: same worker function, checkpoints in <run_dir>/checkpoint_<epoch>."""

    rank, world = 0, 1

    def __init__(self, run_dir: str, emit: Callable[[dict], None]):
        self.fs, self.run_dir = storage_fs(run_dir)
        self.fs.create_dir(self.run_dir, recursive=True)
        self.emit = emit

    def _complete(self) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.run_dir, allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.base_name.startswith("checkpoint_")
                       and not i.base_name.endswith(".tmp") and i.type == pafs.FileType.Directory)
        return names

    def get_checkpoint_dir(self, stack) -> str | None:
        names = self._complete()
        if not names:
            return None
        import pyarrow.fs as pafs

        local = stack.enter_context(tempfile.TemporaryDirectory(prefix="kesi-resume-"))
        pafs.copy_files(f"{self.run_dir}/{names[-1]}", local, source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local

    def report(self, metrics: dict, directory: str | None) -> None:
        if directory is None:
            return
        import pyarrow.fs as pafs

        name = f"checkpoint_{int(metrics['epoch']):06d}"
        tmp = f"{self.run_dir}/{name}.tmp"
        if _exists(self.fs, tmp):
            self.fs.delete_dir(tmp)
        self.fs.create_dir(tmp, recursive=True)
        pafs.copy_files(directory, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        final = f"{self.run_dir}/{name}"
        if _exists(self.fs, final):
            self.fs.delete_dir(final)
        self.fs.move(tmp, final)  # the directory appears complete or not at all (atomic on local disks)
        for old in self._complete()[:-CHECKPOINTS_KEPT]:
            self.fs.delete_dir(f"{self.run_dir}/{old}")


# ----------------------------------------------------------------------------------------------
# the worker

def _device(gpus_per_worker: float, in_ray: bool) -> torch.device:
    if gpus_per_worker > 0 and torch.cuda.is_available():
        if in_ray:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _kd_hook(kd: dict | None, num_classes: int, device: torch.device, tmp: str, lspec: LoaderSpec, seed: int,
             epochs: int):
    """The distillation hook a worker adds to its loss, or None (see `run_training`'s `kd`)."""
    if not kd:
        return None
    from kesi_dist.distill import CachedKD, OnlineKD, SoftLabelCache, load_teachers

    common = dict(temperature=kd["temperature"], alpha=kd["alpha"], num_classes=num_classes)
    if kd["mode"] == "online":
        teachers = load_teachers([_fetch(p, tmp) for p in kd["teachers"]], device=device)
        return OnlineKD(teachers, **common)
    if kd["mode"] == "cached":
        cache = SoftLabelCache(kd["cache_dir"])
        # The labels are only valid for the augmentation this worker will replay.
        cache.check(seed=seed, resolution=lspec.resolution, augment=lspec.augment, epochs=epochs)
        return CachedKD(cache, **common)
    raise UsageError(f"distill.mode {kd['mode']!r}: must be online or cached")


def _node_id() -> str:
    """The Ray node this worker runs on (the host name outside Ray), recorded with every epoch."""
    import socket

    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


class _FailOnce:
    """Wraps a loader: raises InjectedFailure halfway through the epoch (test-only fault injection)."""

    def __init__(self, loader, marker: str, steps: int):
        self.loader, self.marker, self.steps = loader, marker, steps

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        fs, path = storage_fs(self.marker)
        half = self.steps // 2
        for i, batch in enumerate(self.loader):
            if i == half and not _exists(fs, path):
                with fs.open_output_stream(path) as f:
                    f.write(b"fired\n")
                raise InjectedFailure(f"injected worker failure (marker {self.marker})")
            yield batch


def train_worker(config: dict, session: Any = None) -> None:
    """The per-worker training function (Ray Train's `train_loop_per_worker`).

    `config` is `train_loop_config`: {"model", "schedule", "loader", "engine"} (asdict of the specs)
    and "run" (seed, run_dir, events queue, max_steps_per_epoch, inject_failure_at_epoch). `session` is
    None under Ray (a Ray Train session is used) or a local session for num_workers == 0.
    """
    import contextlib

    from kesi_dist.checkpoint import load_checkpoint, load_tensors, model_from_checkpoint, save_checkpoint
    from kesi_dist.data.loaders import make_loader
    from kesi_dist.models import build_model
    from kesi_dist.train.engines import load_engine_state, save_engine_state, wrap_model
    from kesi_dist.train.loop import evaluate, train_epoch
    from kesi_dist.train.optim import build_optimizer, build_scheduler, current_lr

    mspec, sched = ModelSpec(**config["model"]), ScheduleSpec(**config["schedule"])
    lspec, espec, run = LoaderSpec(**config["loader"]), EngineSpec(**config["engine"]), config["run"]
    in_ray = session is None
    if in_ray:
        session = _RaySession(run.get("events"))
    rank, world = session.rank, session.world
    device = _device(espec.gpus_per_worker, in_ray)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(run["seed"])
    node_id = _node_id()

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kesi-worker-"))
        if mspec.init_checkpoint:
            model, masks = model_from_checkpoint(load_checkpoint(_fetch(mspec.init_checkpoint, tmp)))
        else:
            model, masks = build_model(mspec.arch, num_classes=mspec.num_classes, widths=mspec.widths), None
        if lspec.batch_size % world:
            raise UsageError(f"data.batch_size {lspec.batch_size} is not divisible by train.num_workers {world}; "
                             "the batch size is global and split evenly over workers")
        per_worker = lspec.batch_size // world
        common = dict(batch_size=per_worker, resolution=lspec.resolution, augment=lspec.augment,
                      backend=lspec.backend, num_workers=lspec.num_workers, seed=run["seed"],
                      distributed=world > 1, device=device,
                      channels_last=espec.channels_last and device.type == "cuda")
        kd_hook = _kd_hook(config.get("kd"), model.num_classes, device, tmp, lspec, run["seed"], sched.epochs)
        # The cached KD hook finds a batch's soft labels by (epoch, sample index).
        train_loader = make_loader(lspec.data_dir, "train", return_indices=kd_hook is not None, **common)
        val_loader = make_loader(lspec.data_dir, "val", **common)
        max_steps = run.get("max_steps_per_epoch")
        steps_per_epoch = min(len(train_loader), max_steps) if max_steps else len(train_loader)

        resume_dir = session.get_checkpoint_dir(stack)
        state = None
        if resume_dir:
            ck = load_checkpoint(os.path.join(resume_dir, "model.pt"))
            model.load_state_dict(ck["state_dict"])
            masks = ck.get("masks") or masks
            state = load_tensors(os.path.join(resume_dir, "train_state.pt"))
        model.to(device)
        if masks:
            masks = {k: v.to(device) for k, v in masks.items()}
        optimizer = build_optimizer(model.parameters(), optimizer=sched.optimizer, lr=sched.lr,
                                    momentum=sched.momentum, nesterov=sched.nesterov,
                                    weight_decay=sched.weight_decay)
        w = wrap_model(model, optimizer, engine=espec.engine, device=device, zero_stage=espec.zero_stage,
                       bf16=espec.bf16, micro_batch_size=per_worker, masks=masks)
        scheduler = build_scheduler(optimizer, schedule=sched.schedule, epochs=sched.epochs,
                                    steps_per_epoch=steps_per_epoch, lr=sched.lr, milestones=sched.milestones,
                                    gamma=sched.gamma, div_factor=sched.div_factor, pct_start=sched.pct_start,
                                    final_div_factor=sched.final_div_factor)
        history: list[dict] = []
        start_epoch = 0
        if state is not None:
            if state.get("schedule") != config["schedule"]:
                changed = sorted(k for k in config["schedule"] if state.get("schedule", {}).get(k) != config["schedule"][k])
                raise UsageError(f"cannot resume {run['run_dir']}: the schedule changed since its checkpoint "
                                 f"({', '.join(changed)}); restore it or start without --resume")
            load_engine_state(w, resume_dir, rank)
            scheduler.load_state_dict(state["scheduler"])
            history, start_epoch = list(state["history"]), int(state["epoch"]) + 1
        session.emit({"event": "attempt", "start_epoch": start_epoch, "history": history})

        for epoch in range(start_epoch, sched.epochs):
            session.emit({"event": "epoch_start", "epoch": epoch})
            for ld in (train_loader, val_loader):
                ld.set_epoch(epoch)
            if kd_hook is not None:
                kd_hook.set_epoch(epoch)
            loader = train_loader
            inject = run.get("inject_failure_at_epoch")
            if inject is not None and epoch == inject and rank == min(1, world - 1):
                loader = _FailOnce(train_loader, run["run_dir"].rstrip("/") + f"/.kesi_injected_failure_epoch{epoch}",
                                  steps_per_epoch)
            lr = current_lr(optimizer)
            try:
                m = train_epoch(w.model, loader, optimizer, scheduler, masks=masks, device=device,
                                autocast_bf16=espec.bf16, channels_last=espec.channels_last,
                                max_steps=max_steps, engine=w.engine, kd_loss_fn=kd_hook)
            except DivergedError as e:
                raise DivergedError(f"diverged at epoch {epoch + 1}: {e}") from None
            m.update(evaluate(w.model, val_loader, device, autocast_bf16=espec.bf16,
                              channels_last=espec.channels_last))
            m.update({"epoch": epoch, "lr": lr, "lr_end": current_lr(optimizer), "world_size": world,
                      "node_id": node_id})
            history.append(m)

            ckpt_dir = None
            if rank == 0 or w.engine is not None:
                ckpt_dir = tempfile.mkdtemp(prefix=f"epoch{epoch}-", dir=tmp)
                if rank == 0:
                    save_checkpoint(os.path.join(ckpt_dir, "model.pt"), w.bare, masks=masks, metrics=m,
                                    extra={"epoch": epoch})
                    torch.save({"epoch": epoch, "scheduler": scheduler.state_dict(), "history": history,
                                "schedule": config["schedule"]},
                               os.path.join(ckpt_dir, "train_state.pt"))
                save_engine_state(w, ckpt_dir, rank)
            session.report(m, ckpt_dir)
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            session.emit({"event": "epoch", "metrics": m})
        for h in w.hooks:
            h.remove()


# ----------------------------------------------------------------------------------------------
# the driver

def _fmt(m: dict, epochs: int, name: str) -> str:
    return (f"[bold]{name}[/] epoch {m['epoch'] + 1}/{epochs}  loss {m['train/loss']:.4f}  "
            f"acc {100 * m['train/acc']:.1f}%  val loss {m['val/loss']:.4f}  val acc {100 * m['val/acc']:.1f}%  "
            f"lr {m['lr']:.4g}  {m['images_per_s']:.0f} img/s  {m['epoch_s']:.1f}s")


def _failure_message(err: BaseException) -> tuple[type[Exception], str]:
    """The root cause of a Ray Train failure, as (error class, one line)."""
    failures = getattr(err, "worker_failures", None) or {}
    causes = list(failures.values()) or [getattr(err, "controller_failure", None) or err]
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
    kd: dict[str, Any] | None = None,
) -> TrainResult:
    """Train one model on a Ray Train worker group (or in-process when engine.num_workers == 0).

    Args:
        model, schedule, loader, engine: what to train, how, on what data, where (see their docs).
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
        inject_failure_at_epoch: TEST ONLY, see the module docstring.
        kd: distillation: {"mode": "online", "teachers": [checkpoint paths/URIs]} (each worker runs the
            frozen teachers on its own shard of every batch) or {"mode": "cached", "cache_dir": path}
            (soft labels precomputed by `kesi_dist.distill.build_soft_label_cache` with this run's
            seed, read by (epoch, sample index)); both with "temperature" and "alpha".

    Raises:
        DivergedError: the loss became NaN/inf (no checkpoint of that epoch was written).
        RunError / UsageError: the run failed; the message is the workers' root cause.
    """
    if engine.num_workers < 0:
        raise UsageError(f"train.num_workers must be >= 0, got {engine.num_workers}")
    if loader.batch_size % max(1, engine.num_workers):
        raise UsageError(f"data.batch_size {loader.batch_size} is not divisible by train.num_workers "
                         f"{engine.num_workers}; the batch size is global and split evenly over workers")
    fs, run_path = storage_fs(storage_path)
    run_dir = f"{run_path.rstrip('/')}/{name}"
    run_uri = storage_path.rstrip("/") + "/" + name if "://" in storage_path else run_dir
    if not resume and _exists(fs, run_dir):
        fs.delete_dir(run_dir)
    config = {
        "model": asdict(model), "schedule": asdict(schedule), "loader": asdict(loader), "engine": asdict(engine),
        "kd": kd,
        "run": {"seed": seed, "run_dir": run_uri, "max_steps_per_epoch": max_steps_per_epoch,
                "inject_failure_at_epoch": inject_failure_at_epoch, "events": None},
    }
    from rich.console import Console

    from kesi_dist.train.tensorboard import ScalarWriter

    console = Console(stderr=True, highlight=False)
    history: list[dict] = []
    started: list[int] = []
    attempts = 0
    writer = ScalarWriter(tensorboard_dir)

    def handle(event: dict) -> None:
        nonlocal attempts, history
        kind = event["event"]
        if kind == "attempt":
            attempts += 1
            history = list(event["history"])
            if attempts > 1 and progress:
                console.print(f"[yellow]{name}: worker group restarted, resuming at epoch {event['start_epoch'] + 1}")
        elif kind == "epoch_start":
            started.append(event["epoch"])
        elif kind == "epoch":
            m = event["metrics"]
            history.append(m)
            writer.scalars({k: v for k, v in m.items() if k.startswith(("train/", "val/"))
                            or k in ("lr", "images_per_s", "epoch_s")}, step=m["epoch"] + 1)
            if progress:
                console.print(_fmt(m, schedule.epochs, name), soft_wrap=True)
            if on_epoch is not None:
                on_epoch(m)

    try:
        if engine.num_workers == 0:
            last = _run_local(config, run_uri, handle)
        else:
            last = _run_ray(config, engine, storage_path, name, handle)
        if not history:
            raise RunError(f"run {name!r}: no epoch completed (is schedule.epochs already reached?)")
        final = None
        if final_checkpoint:
            final = _export_final(last, final_checkpoint)
        if hparams:
            writer.hparams(hparams, {k: history[-1][k] for k in ("val/acc", "val/loss", "train/loss")})
    finally:
        writer.close()
    return TrainResult(metrics=history[-1], history=history, started=started, attempts=attempts,
                       checkpoint=final, run_dir=run_uri)


def _run_local(config: dict, run_uri: str, handle: Callable[[dict], None]):
    """Returns (filesystem, path) of the last checkpoint directory, or None."""
    session = _LocalSession(run_uri, handle)
    train_worker(config, session)
    names = session._complete()
    return (session.fs, f"{session.run_dir}/{names[-1]}") if names else None


def _backend(engine: EngineSpec) -> str:
    """nccl on GPUs, gloo on CPU. NCCL refuses two ranks on one GPU, so a group whose workers hold
    fractions of GPUs (and may share one) uses gloo; fractional GPUs are mainly for single-worker
    Tune trials sharing a GPU, which never communicate anyway."""
    if engine.gpus_per_worker <= 0:
        return "gloo"
    return "nccl" if engine.gpus_per_worker >= 1 or engine.num_workers == 1 else "gloo"


def _run_ray(config: dict, engine: EngineSpec, storage_path: str, name: str, handle):
    """Returns (filesystem, path) of the last checkpoint directory, or None."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise RunError("Ray is not initialised: call ray.init (or kesi_dist.cluster.connect_ray) before "
                       "run_training with train.num_workers > 0")
    use_gpu = engine.gpus_per_worker > 0
    # The queue lives on this (the driver's) node, like Ray Train's controller: losing a worker node
    # must not take the epoch events with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    config["run"]["events"] = events
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
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the calling thread
            box["error"] = e

    thread = threading.Thread(target=fit, name=f"fit-{name}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                handle(events.get(timeout=0.5))
            except Empty:
                if not thread.is_alive():
                    break
        while not events.empty():  # anything that arrived after fit returned
            handle(events.get_nowait())
    finally:
        thread.join()
        ray.kill(events.actor)
    if "error" in box:
        cls, line = _failure_message(box["error"])
        raise cls(f"training run {name!r} failed: {line}") from None
    ckpt = box["result"].checkpoint
    return (ckpt.filesystem, ckpt.path) if ckpt is not None else None


def _export_final(last, dest: str) -> str:
    """Copy `model.pt` of the last checkpoint to `dest` (local path or URI), atomically on local disk."""
    if not last:
        raise RunError("no checkpoint was reported; nothing to export")
    src_fs, src = last
    dst_fs, dst = storage_fs(dest)
    parent = os.path.dirname(dst)
    dst_fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{os.path.basename(dst)}.{os.getpid()}.tmp"
    with src_fs.open_input_stream(f"{src}/model.pt") as fin, dst_fs.open_output_stream(tmp) as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
    dst_fs.move(tmp, dst)
    return dest
