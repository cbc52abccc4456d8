"""A Ray Train worker process SIGKILLed mid-run (a real dead process, not an injected exception).

A 2-worker TorchTrainer (DDP over gloo) trains 4 epochs; once epoch 2's checkpoint is reported, one
RayTrainWorker process is killed with SIGKILL. Ray Train restarts the group from its last registered
checkpoint: the first epoch after the restart is that checkpoint's next one (never epoch 0), and the
classification run ends with the weights of an uninterrupted run, bit for bit. The distillation run (online
teachers on every worker's shard) survives the same kill.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from kesi_dist.checkpoint import load_checkpoint, save_checkpoint
from kesi_dist.models import build_model
from kesi_dist.runtime import run_training
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec
from kesi_dist.train.task_specs import ClassificationSpec, DistillationSpec, TaskSpec

pytestmark = pytest.mark.slow

SCHEDULE = ScheduleSpec(epochs=4, lr=0.05, schedule="onecycle", pct_start=0.25)
ENGINE = EngineSpec(num_workers=2, max_failures=1)


def _train_worker_pids() -> list[int]:
    """Processes of Ray Train workers on this machine (Ray names them ray::RayTrainWorker...)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if "RayTrainWorker" in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _run(tiny_data, tmp_path, name: str, kill_after_epoch: int | None, task: TaskSpec = ClassificationSpec()):
    killed: list[int] = []

    def on_epoch(m: dict) -> None:  # in the driver, once rank 0 reported epoch m["epoch"] and its checkpoint
        if kill_after_epoch is not None and m["epoch"] == kill_after_epoch and not killed:
            pids = _train_worker_pids()
            assert len(pids) >= 2, pids
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    result = run_training(
        model=ModelSpec("resnet20", num_classes=4), schedule=SCHEDULE,
        loader=LoaderSpec(tiny_data, batch_size=64, resolution=16, num_workers=1, backend="torch"), engine=ENGINE,
        storage_path=str(tmp_path / "storage"), name=name, seed=0, final_checkpoint=str(tmp_path / f"{name}.pt"),
        progress=False, on_epoch=on_epoch, max_steps_per_epoch=6, task=task,
    )
    return result, killed


def test_a_killed_worker_process_restarts_the_group_from_its_last_checkpoint(ray_local, tiny_data, tmp_path):
    result, killed = _run(tiny_data, tmp_path, "killed", kill_after_epoch=2)
    assert killed and not os.path.exists(f"/proc/{killed[0]}")
    _resumed_from_a_checkpoint(result, killed_after=2)
    clean, _ = _run(tiny_data, tmp_path / "clean", "clean", kill_after_epoch=None)
    assert clean.attempts == 1
    a, b = load_checkpoint(result.checkpoint)["state_dict"], load_checkpoint(clean.checkpoint)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run's"


def test_distillation_survives_a_killed_worker_process(ray_local, tiny_data, tmp_path):
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(teacher, build_model("resnet20", 4))
    task = DistillationSpec(teachers=(str(teacher),), temperature=4.0)
    result, killed = _run(tiny_data, tmp_path, "distill", kill_after_epoch=2, task=task)
    assert killed
    _resumed_from_a_checkpoint(result, killed_after=2)
    assert "train/kd_loss" in result.history[-1]


def _resumed_from_a_checkpoint(result, killed_after: int) -> None:
    """The group ran twice; the second attempt began at the epoch after a checkpoint (Ray Train registers
    a reported checkpoint asynchronously, so the one just reported at the kill may not count yet: then it
    is the one before), trained from there on, and every epoch is in the history once."""
    first, restart = result.resumed_at
    assert result.attempts == 2 and first == 0 and 1 <= restart <= killed_after + 1, result.resumed_at
    s = result.started
    split = next(i for i in range(1, len(s)) if s[i] <= s[i - 1])  # where the second attempt begins
    assert s[:split] == list(range(split)) and split >= restart, s  # attempt 1: epochs 0..split-1
    assert s[split:] == list(range(restart, SCHEDULE.epochs)), s  # attempt 2: from the checkpoint on, not 0
    assert [m["epoch"] for m in result.history] == list(range(SCHEDULE.epochs))
