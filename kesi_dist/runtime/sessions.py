"""How a training worker reports its epochs: through Ray Train, or in-process without Ray.

A session gives the worker its rank and world size, the checkpoint to resume from, a way to report an
epoch's metrics with its checkpoint folder, and `emit` for events the driver prints (rank 0 only).
`RaySession` is Ray Train's (checkpoints go wherever the TorchTrainer's storage is); `LocalSession`
is for `num_workers == 0`: the same worker function, checkpoints in `<run_dir>/checkpoint_<epoch>`
folders written whole (`kesi_dist.storage.publish_dir`), the last `CHECKPOINTS_KEPT` kept.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Callable

from kesi_dist import storage

__all__ = ["RaySession", "LocalSession", "CHECKPOINTS_KEPT"]

CHECKPOINTS_KEPT = 2


class RaySession:
    """Inside a Ray Train worker; `events` is the driver's queue (None: no events)."""

    def __init__(self, events):
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.events = events

    def checkpoint_dir(self, stack: contextlib.ExitStack) -> str | None:
        ckpt = self._train.get_checkpoint()
        return stack.enter_context(ckpt.as_directory()) if ckpt else None

    def report(self, metrics: dict, directory: str | None) -> None:
        from ray.train import Checkpoint

        self._train.report(metrics, checkpoint=Checkpoint.from_directory(directory) if directory else None)

    def emit(self, event: dict) -> None:
        if self.rank == 0 and self.events is not None:
            self.events.put(event)


class LocalSession:
    """num_workers == 0: one process, checkpoints under `run_dir` (a local path or storage URI)."""

    rank, world = 0, 1

    def __init__(self, run_dir: str, emit: Callable[[dict], None]):
        self.run_dir = run_dir
        storage.makedirs(run_dir)
        self.emit = emit

    def checkpoints(self) -> list[str]:
        """Names of the complete checkpoint folders, oldest first (temp folders start with '.')."""
        return [n for n in storage.listdir(self.run_dir) if n.startswith("checkpoint_") and not n.endswith(".tmp")
                and storage.published(storage.join(self.run_dir, n))]

    def last_checkpoint(self) -> str | None:
        names = self.checkpoints()
        return storage.join(self.run_dir, names[-1]) if names else None

    def checkpoint_dir(self, stack: contextlib.ExitStack) -> str | None:
        last = self.last_checkpoint()
        if last is None:
            return None
        if not storage.is_uri(last):
            return last
        local = stack.enter_context(tempfile.TemporaryDirectory(prefix="kesi-resume-"))
        for name in storage.listdir(last):
            storage.copy_file(storage.join(last, name), f"{local}/{name}")
        return local

    def report(self, metrics: dict, directory: str | None) -> None:
        if directory is None:
            return
        storage.publish_dir(directory, storage.join(self.run_dir, f"checkpoint_{int(metrics['epoch']):06d}"))
        for old in self.checkpoints()[:-CHECKPOINTS_KEPT]:
            storage.remove_dir(storage.join(self.run_dir, old))
