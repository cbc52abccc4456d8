"""Starting a run: what `kesi run` and `kesi train` do before and around a method's recipe.

    preflight  mistakes visible from the config (a given baseline of another model, a prepared data
               folder that is missing or has other classes, a broken latency table), before Ray starts
    folder     the run folder's refusals (`check_run`) and its lease (one driver per folder), before
               Ray starts too: a refused run costs seconds, not Ray's start-up
    cluster    connect Ray; the cluster can fit one training run and its GPUs work; a local --output is
               seen by every node
    run folder create it, or reopen it for --resume (refusing another config), as a RunContext
    recipe     the method's `run(cfg, ctx)`; a failure marks the run failed and is re-raised

Ctrl-C (SIGINT) and SIGTERM (a preempted node, `ray job stop`) stop the driver within seconds: the stage
in flight is marked "interrupted" (not failed), Ray is shut down, the lease released, and the CLI prints
one line with the `--resume` command (exit 130 / 143). A second signal while stopping exits at once.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from kesi_dist import storage
from kesi_dist.budget import run_budget
from kesi_dist.checkpoint import load_checkpoint
from kesi_dist.config import Config, num_classes
from kesi_dist.data.loaders import read_meta
from kesi_dist.errors import Interrupted, KesiError, RunError, UsageError
from kesi_dist.methods import METHODS
from kesi_dist.methods.opening import open_recipe
from kesi_dist.model_config import default_num_classes
from kesi_dist.runs import RunContext, fmt_acc, fmt_size, open_run
from kesi_dist.runs.lease import Lease
from kesi_dist.runs.rundir import check_run
from kesi_dist.stages.baseline import load_weights
from kesi_dist.train.spec import ModelSpec

__all__ = ["run_method", "train_baseline", "open_context", "resume_command"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"guards": 0, "stopping": False}


def _on_signal(signum, frame) -> None:
    if _state["stopping"]:  # a second signal while the first one's stop is under way: go now
        os._exit(128 + signum)
    _state["stopping"] = True
    Interrupted.received = signal.Signals(signum).name
    raise Interrupted(Interrupted.received)


def _install() -> None:
    """Our handlers for SIGINT and SIGTERM (again after `ray.init`, which sets its own for SIGTERM)."""
    if _state["guards"]:
        for s in _SIGNALS:
            signal.signal(s, _on_signal)


@contextmanager
def _signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the driver while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in _SIGNALS}
    _state["guards"] += 1
    _install()
    try:
        yield
    finally:
        _state["guards"] -= 1
        if not _state["guards"]:
            _state["stopping"], Interrupted.received = False, None
        for s, handler in before.items():
            signal.signal(s, handler)


def resume_command(argv: list[str] | None, resume: bool = True) -> str:
    """The command the user ran (`argv` after `kesi`), with `--resume` at the end (or without it)."""
    if not argv:
        return "kesi run CONFIG --output OUT" + (" --resume" if resume else "")
    return shlex.join(["kesi", *[a for a in argv if a != "--resume"], *(["--resume"] if resume else [])])


def _preflight(cfg: Config) -> None:
    meta = None
    if cfg.data.source == "prepared" and cfg.data.prepared:
        meta = read_meta(cfg.data.prepared)  # missing, incomplete or truncated: one line naming the file
        num_classes(cfg, meta)  # model.num_classes against the data
    run_budget(cfg)  # a latency budget's table: read, validated and checked against the network
    if cfg.model.weights:  # read and checked against the network (and the data's classes) before Ray starts
        _check_weights(cfg, meta)
    path = cfg.baseline.checkpoint
    if not path:
        return
    try:
        ck = load_checkpoint(path)
    except RunError as e:
        raise RunError(f"baseline.checkpoint: {e}") from None
    if ck["arch"] != cfg.model.arch:
        raise UsageError(f"baseline.checkpoint {path}: holds a {ck['arch']}, but model.arch is {cfg.model.arch}")
    if cfg.model.num_classes and ck["num_classes"] != cfg.model.num_classes:
        raise UsageError(f"baseline.checkpoint {path}: has {ck['num_classes']} classes, but model.num_classes "
                         f"is {cfg.model.num_classes}")
    if meta is not None and ck["num_classes"] != meta["num_classes"]:
        raise UsageError(f"baseline.checkpoint {path}: has {ck['num_classes']} classes, the data has "
                         f"{meta['num_classes']}")


def _check_weights(cfg: Config, meta: dict | None) -> None:
    known = meta is not None or bool(cfg.model.num_classes) or cfg.data.source != "imagefolder"
    classes = num_classes(cfg, meta) if meta else default_num_classes(cfg)
    load_weights(cfg.model.weights, ModelSpec(cfg.model.arch, classes, options=cfg.model.options()),
                 as_is=known and cfg.baseline.epochs == 0)


def open_context(cfg: Config, output: str, resume: bool, *, title: str, use_ray: bool = True,
                 max_steps: int | None = None) -> RunContext:
    """Checks, the folder's lease, then the run folder and its context (`ctx.close()` releases the
    lease). `use_ray=False`: everything runs in this process (`kesi train` with `train.num_workers: 0`),
    so no Ray is started."""
    _preflight(cfg)
    config = cfg.model_dump(mode="json")
    run, _ = check_run(output, config, resume)  # every refusal of the folder, before anything is written
    existed = storage.exists(run.root)
    lease = Lease.acquire(run.root)
    try:
        shared_with = []
        if use_ray:
            from kesi_dist.runtime import check_gpus, check_resources, check_shared_path, connect_ray

            connect_ray(cfg.cluster.address)
            _install()  # ray.init replaced the SIGTERM handler
            t = cfg.train
            workers = max(t.num_workers, 1)  # num_workers == 0: a branch trial holds one worker's resources
            check_resources(workers * t.gpus_per_worker, workers * t.cpus_per_worker)
            check_gpus(t.gpus_per_worker)  # a GPU Ray advertises but CUDA cannot use: stop before anything runs
            shared_with = check_shared_path(output)
        run, manifest = open_run(output, config, resume)
    except BaseException:
        lease.release()
        if not existed and not storage.is_uri(run.root) and os.path.isdir(run.root) and not os.listdir(run.root):
            os.rmdir(run.root)  # refused before the run began: no empty folder left behind
        raise
    ctx = RunContext(run, manifest, resolution=cfg.data.resolution, max_steps=max_steps)
    ctx.lease = lease
    ctx.console.rule(f"{title} · {run.root}")
    if shared_with:
        ctx.print(f"output {output}: visible from all {len(shared_with)} other node(s) with CPUs/GPUs")
    return ctx


def _stopped(e: KeyboardInterrupt, ctx: RunContext | None, resume: bool, command: list[str] | None) -> Interrupted:
    """Record an interrupted run, shut Ray down; the Interrupted whose message the CLI prints."""
    signame = Interrupted.signal_of(e)
    if ctx is not None:
        ctx.interrupt(signame)
    try:
        from kesi_dist.runtime import disconnect_ray

        disconnect_ray()
    except Exception:  # noqa: BLE001 - Ray may already be half down (its processes got the signal too)
        pass
    stage = ctx.interrupted_stage if ctx is not None else None
    where = f"during stage {stage}" if stage else "before the run began" if ctx is None else "between stages"
    has_run = ctx is not None or resume
    again = f"{'resume' if has_run else 'start it again'} with: {resume_command(command, has_run)}"
    return Interrupted(signame, f"interrupted by {signame} {where}; {again}")


def run_method(cfg: Config, output: str, resume: bool = False, *, max_steps: int | None = None,
               command: list[str] | None = None) -> RunContext:
    """`kesi run`: the whole pipeline of `cfg.method` into `output` (a folder or storage URI).
    `command`: the words after `kesi` (the `--resume` line of an interrupted run repeats them)."""
    method = METHODS[cfg.method.name]
    title = f"kesi run · {method.name} · {method.module('report').layout(cfg).title}"
    ctx = None
    with _signals():
        try:
            ctx = open_context(cfg, output, resume, title=title, max_steps=max_steps)
            try:
                method.module("recipe").run(cfg, ctx)
            except KesiError as e:
                ctx.fail(str(e))
                raise
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (`_on_signal`)
            raise _stopped(e, ctx, resume, command) from None
        finally:
            if ctx is not None:
                ctx.close()
    ctx.print(f"[green]done[/]: report in {ctx.run.path('report.md')}")
    return ctx


def train_baseline(cfg: Config, output: str, resume: bool = False, *, command: list[str] | None = None) -> dict:
    """`kesi train`: the data and baseline stages of a run into `output`; returns the baseline's entry.

    The folder is a run folder like `kesi run`'s (a later `kesi run --resume` of the same config reuses
    the baseline); the baseline is `<output>/snapshots/baseline.pt`.
    """
    ctx = None
    with _signals():
        try:
            ctx = open_context(cfg, output, resume, title=f"kesi train · {cfg.model.arch}",
                               use_ray=cfg.train.num_workers > 0)
            try:
                entry = open_recipe(cfg, ctx).baseline
            except KesiError as e:
                ctx.fail(str(e))
                raise
            ctx.complete()
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (`_on_signal`)
            raise _stopped(e, ctx, resume, command) from None
        finally:
            if ctx is not None:
                ctx.close()
    ctx.print(f"baseline: {fmt_acc(entry)}, {fmt_size(entry)} -> {ctx.snapshot('baseline')}")
    return entry
