"""RunContext: what a stage is handed, and the bookkeeping every stage shares.

    with ctx.stage("baseline") as st:
        if st.done:                      # complete in the manifest: reused, nothing redone
            return st.record[...]
        ...                              # write the stage's outputs first
        st.update(key=value)             # recorded with the stage when the block ends normally

A stage is marked complete only after its body has returned (its outputs are on disk), so a driver
killed inside a stage leaves it "running" and `--resume` redoes it; a `KesiError` marks it "failed"
with its message, a signal (`Interrupted`: Ctrl-C, SIGTERM) "interrupted". Snapshots are registered with their size read from the file itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from rich.console import Console

from kesi_dist.errors import Interrupted, KesiError
from kesi_dist.runs.manifest import Manifest
from kesi_dist.runs.rundir import RunDir

__all__ = ["RunContext", "Stage", "describe_snapshot", "fmt_size", "fmt_acc", "select_acc"]


def describe_snapshot(path: str, resolution: int) -> dict:
    """Architecture and size of a saved snapshot (what the registry records)."""
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
    from kesi_dist.pruning import count_macs, count_nonzero_params, count_params

    ck = load_checkpoint(path)
    model, _ = model_from_checkpoint(ck)
    return {"arch": ck["arch"], "widths": ck["widths"], "num_classes": ck["num_classes"],
            "params": count_params(model), "nonzero_params": count_nonzero_params(model),
            "macs": count_macs(model, (3, resolution, resolution))}


def fmt_size(entry: dict) -> str:
    """"0.284 M params (0.284 M nonzero), 51.1 M MACs" of a registry entry or `describe_snapshot`."""
    return f"{entry['params'] / 1e6:.3f} M params ({entry['nonzero_params'] / 1e6:.3f} M nonzero), " \
           f"{entry['macs'] / 1e6:.1f} M MACs"


def select_acc(entry: dict) -> float:
    """The accuracy selection compares for a registry entry: its holdout accuracy, or (a run without a
    holdout, `data.holdout: 0`) its test-split accuracy."""
    held = entry.get("holdout_acc")
    return entry["val_acc"] if held is None else held


def fmt_acc(entry: dict) -> str:
    """"val acc 97.50%, holdout 96.12%": the reported test-split accuracy, and the selection one."""
    held = entry.get("holdout_acc")
    return f"val acc {100 * entry['val_acc']:.2f}%" + ("" if held is None else f", holdout {100 * held:.2f}%")


@dataclass
class Stage:
    """One stage's handle inside `RunContext.stage`: `done` (complete before, reused), `record` (its
    manifest entry), `update(**info)` (what to record with it when it completes)."""

    name: str
    done: bool
    record: dict
    info: dict = field(default_factory=dict)

    def update(self, **info: Any) -> None:
        self.info.update(info)


class RunContext:
    """A run folder, its manifest and console, handed to a method's recipe and to every stage.

    Args:
        run: the run folder (paths; a local folder or a storage URI).
        manifest: its manifest, already created or reopened (`open_run`).
        resolution: input size in pixels (for the MACs of registered snapshots).
        max_steps: cap on optimizer steps per epoch (tests); None trains whole epochs.
    """

    def __init__(self, run: RunDir, manifest: Manifest, *, resolution: int, max_steps: int | None = None):
        self.run, self.manifest, self.resolution, self.max_steps = run, manifest, resolution, max_steps
        self.console = Console(highlight=False, soft_wrap=True)
        self.lease = None  # the driver's hold on the folder (`kesi_dist.runs.lease`), released by `close`
        self.interrupted_stage: str | None = None

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)

    def progress_file(self, name: str) -> str:
        """Where training run `name` keeps its progress (`kesi status` reads `<run>/progress/`)."""
        return self.run.path("progress", f"{name}.json")

    def snapshot(self, name: str) -> str:
        """Where snapshot `name`'s checkpoint lives (written or not)."""
        return self.run.snapshot(name)

    @contextmanager
    def stage(self, name: str, **info: Any) -> Iterator[Stage]:
        """Skip-if-complete / start / finish bookkeeping of stage `name`; `info` is recorded at its start."""
        if self.manifest.is_complete(name):
            self.print(f"[bold]{name}[/]: complete, reused")
            yield Stage(name, True, self.manifest.stages[name])
            return
        self.manifest.start_stage(name, **info)
        st = Stage(name, False, self.manifest.stages[name])
        try:
            yield st
        except KesiError as e:
            self._record(lambda: self.manifest.fail_stage(name, str(e)))
            raise
        except KeyboardInterrupt as e:  # a signal (Interrupted), or one Ray re-raised as a KeyboardInterrupt
            self.interrupted_stage = self.interrupted_stage or name  # the innermost stage in flight
            self._record(lambda: self.manifest.interrupt_stage(name, Interrupted.signal_of(e)))
            raise
        self.manifest.finish_stage(name, **st.info)

    def note(self, stage: str, **info: Any) -> None:
        """Record `info` with a running stage now (progress a resumed or watched run can read: a search's
        accepted steps), not only when it completes."""
        self.manifest.stages[stage].update(info)
        self.manifest.save()

    def register(self, name: str, **info: Any) -> dict:
        """Register the snapshot file `ctx.snapshot(name)` with its size and `info`; returns its entry."""
        entry = {**describe_snapshot(self.snapshot(name), self.resolution), **info,
                 "checkpoint": RunDir.snapshot_rel(name)}
        self.manifest.add_snapshot(name, entry)
        return entry

    def complete(self) -> None:
        self.manifest.data["status"] = "complete"
        self.manifest.log("run complete")

    def fail(self, error: str) -> None:
        """Mark the run failed (`kesi_dist.launch` re-raises the error after this)."""
        def mark() -> None:
            self.manifest.data["status"] = "failed"
            self.manifest.log("run failed", error=error)
        self._record(mark)

    def interrupt(self, signame: str) -> None:
        """Mark the run interrupted by signal `signame` (the stage in flight marked itself)."""
        def mark() -> None:
            self.manifest.data["status"] = "interrupted"
            self.manifest.log("run interrupted", signal=signame, stage=self.interrupted_stage)
        self._record(mark)

    def close(self) -> None:
        """Release the folder's lease (the driver is done with the run, whatever the outcome)."""
        if self.lease is not None:
            self.lease.release()

    def _record(self, write) -> None:
        # Recording a failure must not hide it: when the manifest cannot be written either (a full
        # disk), the file keeps its last complete state and the original error is what the user sees.
        try:
            write()
        except (KesiError, OSError):
            pass
