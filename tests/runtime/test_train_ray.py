"""`run_training` on a real 2-worker Ray Train TorchTrainer (CPU, gloo): DDP and DeepSpeed ZeRO-2.

Kept to three runs because each costs Ray Train's start-up on 2 cores. The DeepSpeed run also loses a
worker mid-run (the test-only `inject_failure_at_epoch`), which exercises restoring per-rank ZeRO
optimizer partitions from the checkpoint.
"""

from __future__ import annotations

import os

import pytest

from kesi_dist.checkpoint import load_checkpoint
from kesi_dist.runtime import run_training
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec

pytestmark = pytest.mark.slow

SCHEDULE = ScheduleSpec(epochs=4, lr=0.05, schedule="onecycle", pct_start=0.25)


def _run(tiny_data, tmp_path, engine: EngineSpec, name: str, **kw):
    return run_training(
        model=ModelSpec("resnet20", num_classes=4), schedule=SCHEDULE,
        loader=LoaderSpec(tiny_data, batch_size=64, resolution=16, num_workers=1), engine=engine,
        storage_path=str(tmp_path / "storage"), name=name, seed=0,
        final_checkpoint=str(tmp_path / f"{name}.pt"), progress=False, **kw,
    )


def test_ddp_two_workers_learns_and_logs(ray_local, tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []
    result = _run(tiny_data, tmp_path, EngineSpec(engine="ddp", num_workers=2, max_failures=0), "ddp",
                  tensorboard_dir=str(tmp_path / "tb"), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [0, 1, 2, 3] and result.attempts == 1
    assert all(m["world_size"] == 2 and m["images"] == 1024 for m in result.history)  # both shards counted
    assert result.metrics["train/acc"] > 0.8 and result.metrics["val/acc"] > 0.5  # chance: 0.25
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["arch"] == "resnet20" and ckpt["metrics"]["epoch"] == 3
    # Ray kept the last two epoch checkpoints in storage, each with model + optimizer + schedule state
    ckpts = sorted(d for d in os.listdir(result.run_dir) if os.path.isdir(os.path.join(result.run_dir, d)))
    assert len(ckpts) == 2
    assert {"model.pt", "train_state.pt", "optimizer.pt"} <= set(os.listdir(os.path.join(result.run_dir, ckpts[-1])))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"train/loss", "val/acc", "lr", "images_per_s", "epoch_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_deepspeed_zero2_learns_and_survives_a_worker_failure(ray_local, tiny_data, tmp_path):
    engine = EngineSpec(engine="deepspeed", zero_stage=2, num_workers=2, max_failures=1)
    result = _run(tiny_data, tmp_path, engine, "zero2", inject_failure_at_epoch=2)
    # rank 1 died halfway through epoch 2; the group restarted from the epoch-1 checkpoint
    assert result.attempts == 2
    assert result.started == [0, 1, 2, 2, 3]  # only the epoch in flight was redone
    assert [m["epoch"] for m in result.history] == [0, 1, 2, 3]  # none lost, none repeated
    assert os.path.exists(os.path.join(result.run_dir, ".kesi_injected_failure_epoch2"))
    assert result.metrics["train/acc"] > 0.8 and result.metrics["val/acc"] > 0.5  # chance: 0.25
    ckpts = sorted(d for d in os.listdir(result.run_dir) if os.path.isdir(os.path.join(result.run_dir, d)))
    assert {"optimizer_rank0.pt", "optimizer_rank1.pt"} <= set(os.listdir(os.path.join(result.run_dir, ckpts[-1])))
    assert load_checkpoint(result.checkpoint)["metrics"]["epoch"] == 3


def test_one_worker_trains_the_weights_of_the_in_process_loop(ray_local, tiny_data, tmp_path):
    """`train.num_workers: 1` (a 1-worker TorchTrainer) and 0 (the same worker function in this process)
    are the same run: bitwise-equal weights after 6 steps."""
    import torch

    runs = {}
    for workers in (0, 1):
        result = run_training(
            model=ModelSpec("resnet20", num_classes=4), schedule=ScheduleSpec(epochs=1, lr=0.1, schedule="onecycle"),
            loader=LoaderSpec(tiny_data, batch_size=64, resolution=16, num_workers=1, backend="torch"),
            engine=EngineSpec(num_workers=workers, max_failures=0), storage_path=str(tmp_path / "storage"),
            name=f"w{workers}", seed=3, final_checkpoint=str(tmp_path / f"w{workers}.pt"), progress=False,
            max_steps_per_epoch=6)
        assert result.metrics.get("world_size", 1) == max(1, workers)
        runs[workers] = load_checkpoint(result.checkpoint)["state_dict"]
    differ = [k for k in runs[0] if not torch.equal(runs[0][k], runs[1][k])]
    assert not differ, differ[:5]
