"""The per-worker training function: what one Ray Train worker (or the in-process run) does.

    setup    model (built, or from a checkpoint with its masks), task, loaders, optimizer, engine
    resume   weights, optimizer, scheduler and history from the last epoch checkpoint, if any
    epoch    one epoch of the task, then evaluation (holdout every epoch, the test split after the last;
             see `LoaderSpec`), summed over ranks
    save     the epoch's checkpoint folder, reported to the session (Ray Train or local)

Every input travels in `config` (plain dicts of `kesi_dist.train.spec`, and the task's spec from
`kesi_dist.train.task_specs` as it is), so a worker on any node builds everything itself. A checkpoint folder holds `model.pt` (kesi_dist checkpoint
format), `train_state.pt` (epoch, scheduler, history, schedule) and the optimizer state (`optimizer.pt`,
or `optimizer_rank{r}.pt` per rank under DeepSpeed ZeRO).

Fault injection for tests: `run.inject_failure_at_epoch=k` makes rank 1 (rank 0 with one worker) raise
`InjectedFailure` halfway through epoch k, once (a marker file in the run's storage folder records
that it fired). Only `run_training`'s keyword sets it: no config key or environment variable can.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from kesi_dist import storage
from kesi_dist.checkpoint import load_checkpoint, load_tensors, model_from_checkpoint, save_checkpoint
from kesi_dist.data.loaders import make_loader
from kesi_dist.errors import UsageError
from kesi_dist.models import build_model
from kesi_dist.pruning.masks import MaskConstraint
from kesi_dist.runtime.sessions import LocalSession, RaySession
from kesi_dist.train.devices import compute_device
from kesi_dist.train.engines import load_engine_state, save_engine_state, wrap_model
from kesi_dist.train.loop import DivergedError, evaluate, train_epoch
from kesi_dist.train.optim import build_optimizer, build_scheduler, current_lr
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec
from kesi_dist.train.task_specs import ClassificationSpec, WorkerEnv

__all__ = ["train_worker", "InjectedFailure"]


class InjectedFailure(RuntimeError):
    """Raised by the test-only fault injection (see the module docstring)."""


class _FailOnce:
    """Wraps a loader: raises InjectedFailure halfway through the epoch, once (marker file)."""

    def __init__(self, loader, marker: str, steps: int):
        self.loader, self.marker, self.steps = loader, marker, steps

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.steps // 2 and not storage.exists(self.marker):
                storage.write_text(self.marker, "fired\n")
                raise InjectedFailure(f"injected worker failure (marker {self.marker})")
            yield batch


def _device(gpus_per_worker: float, in_ray_train: bool) -> torch.device:
    """The worker's device: a GPU request without a usable CUDA device is a RunError, never the CPU."""
    device = compute_device(gpus_per_worker)
    if device.type == "cuda" and in_ray_train:
        import ray.train.torch

        return ray.train.torch.get_device()  # the GPU Ray Train assigned this worker
    return device


def _node_id() -> str:
    """The Ray node this worker runs on (the host name outside Ray), recorded with every epoch."""
    import socket

    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()


class _Worker:
    def __init__(self, config: dict, session: Any):
        self.config = config
        self.mspec, self.sched = ModelSpec(**config["model"]), ScheduleSpec(**config["schedule"])
        self.lspec, self.espec = LoaderSpec(**config["loader"]), EngineSpec(**config["engine"])
        self.tspec, self.run = config.get("task") or ClassificationSpec(), config["run"]
        self.session = session
        self.rank, self.world = session.rank, session.world
        self.started = time.time()  # this process entered the worker function (after Ray Train's start-up)
        self.device = _device(self.espec.gpus_per_worker, isinstance(session, RaySession))

    def setup(self, stack: contextlib.ExitStack) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(self.run["seed"])
        self.node_id = _node_id()
        self.tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kesi-worker-"))
        m = self.mspec
        if m.init_checkpoint:
            self.model, self.masks = model_from_checkpoint(load_checkpoint(m.init_checkpoint))
        else:
            self.model, self.masks = build_model(m.arch, num_classes=m.num_classes, widths=m.widths,
                                                   **m.options), None
        lspec = self.lspec
        if lspec.batch_size % self.world:
            raise UsageError(f"data.batch_size {lspec.batch_size} is not divisible by train.num_workers "
                             f"{self.world}; the batch size is global and split evenly over workers")
        self.per_worker = lspec.batch_size // self.world
        common = dict(batch_size=self.per_worker, resolution=lspec.resolution, augment=lspec.augment,
                      backend=lspec.backend, num_workers=lspec.num_workers, seed=self.run["seed"],
                      distributed=self.world > 1, device=self.device,
                      channels_last=self.espec.channels_last and self.device.type == "cuda")
        self.task = self.tspec.build(WorkerEnv(num_classes=self.model.num_classes, device=self.device,
                                               seed=self.run["seed"], resolution=lspec.resolution,
                                               augment=lspec.augment, epochs=self.sched.epochs, **lspec.split_args))
        # reuse: a Tune trial process trains branch after branch with the same loaders (FFCV compiles each)
        train_common = {**common, "augment": "none"} if getattr(self.task, "augments", False) else common
        self.train_loader = make_loader(lspec.data_dir, "train", return_indices=self.task.needs_indices, reuse=True,
                                        **train_common, **lspec.split_args)
        self.val_loader = make_loader(lspec.data_dir, "val", reuse=True, **common)  # the test split: reported
        self.holdout_loader = (make_loader(lspec.data_dir, "holdout", reuse=True, **common, **lspec.split_args)
                               if lspec.holdout else None)  # the selection split: every epoch
        max_steps = self.run.get("max_steps_per_epoch")
        self.steps_per_epoch = min(len(self.train_loader), max_steps) if max_steps else len(self.train_loader)

    def resume(self, stack: contextlib.ExitStack) -> int:
        """Restore the last epoch checkpoint (if any), then build optimizer, engine and scheduler;
        returns the first epoch to train."""
        self.resume_dir = self.session.checkpoint_dir(stack)
        state = None
        if self.resume_dir:
            ck = load_checkpoint(os.path.join(self.resume_dir, "model.pt"))
            self.model.load_state_dict(ck["state_dict"])
            self.masks = ck.get("masks") or self.masks
            state = load_tensors(os.path.join(self.resume_dir, "train_state.pt"))
        self.model.to(self.device)
        # A task may train a module built around the model (a supernet inside the frozen baseline); the
        # model itself is what every checkpoint saves.
        self.module = self.task.prepare(self.model) if hasattr(self.task, "prepare") else self.model
        if self.masks:
            self.masks = {k: v.to(self.device) for k, v in self.masks.items()}
        self.constraints = [MaskConstraint(self.masks)] if self.masks else []
        s = self.sched
        self.optimizer = build_optimizer([p for p in self.module.parameters() if p.requires_grad],
                                         optimizer=s.optimizer, lr=s.lr,
                                         momentum=s.momentum if s.momentum is not None else max(s.momentum_cycle),
                                         nesterov=s.nesterov, weight_decay=s.weight_decay)
        self.w = wrap_model(self.module, self.optimizer, engine=self.espec.engine, device=self.device,
                            zero_stage=self.espec.zero_stage, bf16=self.espec.bf16,
                            micro_batch_size=self.per_worker, masks=self.masks)
        self.scheduler = build_scheduler(self.optimizer, schedule=s.schedule, epochs=s.epochs,
                                         steps_per_epoch=self.steps_per_epoch, lr=s.lr, milestones=s.milestones,
                                         gamma=s.gamma, div_factor=s.div_factor, pct_start=s.pct_start,
                                         final_div_factor=s.final_div_factor, momentum_cycle=s.momentum_cycle)
        self.history: list[dict] = []
        start = 0
        if state is not None:
            schedule = self.config["schedule"]
            if state.get("schedule") != schedule:
                changed = sorted(k for k in schedule if state.get("schedule", {}).get(k) != schedule[k])
                raise UsageError(f"cannot resume {self.run['run_dir']}: the schedule changed since its checkpoint "
                                 f"({', '.join(changed)}); restore it or start without --resume")
            load_engine_state(self.w, self.resume_dir, self.rank)
            self.scheduler.load_state_dict(state["scheduler"])
            self.history, start = list(state["history"]), int(state["epoch"]) + 1
        self.session.emit({"event": "attempt", "start_epoch": start, "history": self.history})
        return start

    def epoch(self, epoch: int) -> dict:
        begun = time.time()
        self.session.emit({"event": "epoch_start", "epoch": epoch, "steps": self.steps_per_epoch})
        last = [time.monotonic()]

        def tick(step: int) -> None:  # within-epoch progress for the driver's bar, at most twice a second
            if time.monotonic() - last[0] >= 0.5:
                last[0] = time.monotonic()
                self.session.emit({"event": "tick", "step": step})

        for ld in (self.train_loader, self.val_loader, self.holdout_loader):
            if ld is not None:
                ld.set_epoch(epoch)
        self.task.set_epoch(epoch)
        loader = self.train_loader
        inject = self.run.get("inject_failure_at_epoch")
        if inject is not None and epoch == inject and self.rank == min(1, self.world - 1):
            marker = storage.join(self.run["run_dir"], f".kesi_injected_failure_epoch{epoch}")
            loader = _FailOnce(self.train_loader, marker, self.steps_per_epoch)
        lr = current_lr(self.optimizer)
        e = self.espec
        trace: list = []
        try:
            m = train_epoch(self.w.model, loader, self.optimizer, self.scheduler, task=self.task,
                            constraints=self.constraints, device=self.device, autocast_bf16=e.bf16,
                            channels_last=e.channels_last, max_steps=self.run.get("max_steps_per_epoch"),
                            engine=self.w.engine, trace=trace, on_step=tick)
        except DivergedError as err:
            raise DivergedError(f"diverged at epoch {epoch + 1}: {err}") from None
        trained = time.time()
        # Per-step LR and momentum for TensorBoard (the driver writes them), not kept in the metrics.
        self.session.emit({"event": "steps", "first": epoch * self.steps_per_epoch,
                           "lr": [t[0] for t in trace], "momentum": [t[1] for t in trace]})
        # Selection sees the holdout every epoch; the test split is measured once, after the last epoch
        # (every epoch when there is no holdout: it is then the selection split too).
        evals = [(self.holdout_loader, "holdout")] if self.holdout_loader is not None else []
        if self.holdout_loader is None or epoch == self.sched.epochs - 1:
            evals.append((self.val_loader, "val"))
        for ld, prefix in evals:
            m.update(evaluate(self.w.model, ld, self.device, autocast_bf16=e.bf16, channels_last=e.channels_last,
                              prefix=prefix))
        # Wall-clock stamps of the phases (what bench/train_throughput.py splits a run's time by): this
        # process's start, the epoch's start, the end of its training steps, and `time`, evaluation done.
        m.update({"epoch": epoch, "lr": lr, "lr_end": current_lr(self.optimizer), "world_size": self.world,
                  "node_id": self.node_id, "worker_start_time": self.started, "epoch_start_time": begun,
                  "train_end_time": trained, "time": time.time()})
        self.history.append(m)
        return m

    def save(self, epoch: int, metrics: dict) -> None:
        ckpt_dir = None
        if self.rank == 0 or self.w.engine is not None:  # under ZeRO every rank owns optimizer state
            ckpt_dir = tempfile.mkdtemp(prefix=f"epoch{epoch}-", dir=self.tmp)
            if self.rank == 0:
                save_checkpoint(os.path.join(ckpt_dir, "model.pt"), self.model, masks=self.masks,
                                metrics=metrics, extra={"epoch": epoch})
                torch.save({"epoch": epoch, "scheduler": self.scheduler.state_dict(), "history": self.history,
                            "schedule": self.config["schedule"]}, os.path.join(ckpt_dir, "train_state.pt"))
            save_engine_state(self.w, ckpt_dir, self.rank)
        self.session.report(metrics, ckpt_dir)
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        # The driver's copy also says when the checkpoint was written and reported (Ray Train: persisted).
        self.session.emit({"event": "epoch", "metrics": {**metrics, "checkpoint_end_time": time.time()}})

    def close(self) -> None:
        for h in self.w.hooks:
            h.remove()


def train_worker(config: dict, session: LocalSession | None = None) -> None:
    """Ray Train's `train_loop_per_worker` (session None: a Ray Train session), or the in-process run.

    `config`: {"model", "schedule", "loader", "engine"} (asdict of the specs), "task" (a task spec) and "run" (seed,
    run_dir, events queue, max_steps_per_epoch, inject_failure_at_epoch).
    """
    w = _Worker(config, session if session is not None else RaySession(config["run"].get("events")))
    with contextlib.ExitStack() as stack:
        w.setup(stack)
        start = w.resume(stack)
        for epoch in range(start, w.sched.epochs):
            metrics = w.epoch(epoch)
            w.save(epoch, metrics)
        w.close()
