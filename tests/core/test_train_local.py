"""`run_training` in local mode (num_workers=0): the Ray worker function run in-process, no Ray.

Same storage layout and checkpoints as under Ray, so resume, divergence handling, TensorBoard and
the final kesi checkpoint are all checked here cheaply; tests/test_train_ray.py repeats the essentials
on a real 2-worker TorchTrainer.
"""

from __future__ import annotations

import os

import pytest
import torch

from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
from kesi_dist.data.loaders import make_loader
from kesi_dist.runtime import InjectedFailure, run_training
from kesi_dist.train import DivergedError, evaluate
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec

LOCAL = EngineSpec(num_workers=0)


def _loader(data: str, backend: str = "ffcv") -> LoaderSpec:
    """FFCV (the default for real data) in the slow tests; the fast ones, about what the loop does and not
    what the loader yields, read the same .beton files with the torch backend: it yields what FFCV yields
    (tests/core/test_data_loaders.py) and compiles no pipeline (FFCV: seconds per loader)."""
    if backend == "torch":
        return LoaderSpec(data, batch_size=64, resolution=16, backend="torch", num_workers=0)
    return LoaderSpec(data, batch_size=64, resolution=16, num_workers=1)


@pytest.mark.slow
def test_local_run_learns_writes_tensorboard_and_a_kesi_checkpoint(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []
    result = run_training(
        model=ModelSpec("resnet20", num_classes=4), loader=_loader(tiny_data), engine=LOCAL,
        schedule=ScheduleSpec(epochs=3, lr=0.05, schedule="onecycle", pct_start=0.25),
        storage_path=str(tmp_path / "runs"), name="base", seed=0, tensorboard_dir=str(tmp_path / "tb"),
        final_checkpoint=str(tmp_path / "baseline.pt"), on_epoch=seen.append, hparams={"lr": 0.05},
        progress=False,
    )
    assert [m["epoch"] for m in result.history] == [0, 1, 2] == [m["epoch"] for m in seen]
    assert result.started == [0, 1, 2] and result.attempts == 1
    assert result.metrics["train/acc"] > 0.8 and result.metrics["val/acc"] > 0.6  # chance: 0.25
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]

    # the final checkpoint is in the kesi format and reproduces the reported val accuracy
    model, masks = model_from_checkpoint(load_checkpoint(tmp_path / "baseline.pt"))
    assert masks is None and model.arch == "resnet20" and model.num_classes == 4
    val = make_loader(tiny_data, "val", batch_size=64, resolution=16, num_workers=1)
    assert evaluate(model, val)["val/acc"] == pytest.approx(result.metrics["val/acc"], abs=1e-6)

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "images_per_s", "epoch_s"} <= tags
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 2, 3]
    assert acc.Scalars("val/acc")[-1].value == pytest.approx(result.metrics["val/acc"])
    assert "hparam/val/acc" in tags


@pytest.mark.slow
def test_local_resume_after_a_failure_continues_from_the_last_epoch(tiny_data, tmp_path):
    kw = dict(model=ModelSpec("resnet20", num_classes=4), loader=_loader(tiny_data), engine=LOCAL,
              schedule=ScheduleSpec(epochs=3, lr=0.05), storage_path=str(tmp_path / "runs"), name="r",
              progress=False, max_steps_per_epoch=4)
    ref = run_training(**kw)
    with pytest.raises(InjectedFailure):
        run_training(**kw, inject_failure_at_epoch=1)
    assert sorted(os.listdir(tmp_path / "runs" / "r")) == [".kesi_injected_failure_epoch1", "checkpoint_000000"]
    # the marker makes the injection fire once only; the resumed run redoes epoch 1 and finishes
    resumed = run_training(**kw, inject_failure_at_epoch=1, resume=True, final_checkpoint=str(tmp_path / "f.pt"))
    assert resumed.started == [1, 2]
    assert [m["epoch"] for m in resumed.history] == [0, 1, 2]
    # resuming restores weights, optimizer and schedule: the trajectory equals the uninterrupted run
    for a, b in zip(resumed.history, ref.history):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"])
    # without resume the old run folder is cleared, never silently continued
    fresh = run_training(**kw)
    assert fresh.started == [0, 1, 2]


def test_local_divergence_stops_before_writing_that_epoch(tiny_data, tmp_path):
    kw = dict(model=ModelSpec("resnet20", num_classes=4), loader=_loader(tiny_data, "torch"), engine=LOCAL,
              storage_path=str(tmp_path / "runs"), name="d", progress=False, max_steps_per_epoch=4)
    with pytest.raises(DivergedError, match="diverged"):
        run_training(schedule=ScheduleSpec(epochs=3, lr=1e9, schedule="constant", momentum=0.9), **kw)
    assert not [p for p in os.listdir(tmp_path / "runs" / "d") if p.startswith("checkpoint_")]


def test_mwp_masks_from_the_init_checkpoint_are_enforced(tiny_data, tmp_path):
    from kesi_dist.checkpoint import save_checkpoint
    from kesi_dist.models import build_model
    from kesi_dist.pruning import apply_masks, mwp_masks

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=4)
    masks = mwp_masks(model, 0.6)
    apply_masks(model, masks)
    save_checkpoint(tmp_path / "pruned.pt", model, masks=masks)
    run_training(model=ModelSpec("ignored", init_checkpoint=str(tmp_path / "pruned.pt")),
                 loader=_loader(tiny_data, "torch"), engine=LOCAL,
                 schedule=ScheduleSpec(epochs=1, lr=0.1, optimizer="sgd", weight_decay=1e-3),
                 storage_path=str(tmp_path / "runs"), name="m", progress=False, max_steps_per_epoch=4,
                 final_checkpoint=str(tmp_path / "out.pt"))
    out = load_checkpoint(tmp_path / "out.pt")
    assert out["arch"] == "resnet20" and set(out["masks"]) == set(masks)
    for name, mask in masks.items():
        w = out["state_dict"][name]
        assert (w[mask == 0] == 0).all() and not torch.equal(w, model.state_dict()[name])


def test_every_epoch_records_when_each_of_its_phases_ended(tiny_data, tmp_path):
    """The stamps bench/train_throughput.py splits a run's time by: the worker's start, then per epoch its
    start, the end of its training steps, of its evaluation (`time`) and of its checkpoint, in that order."""
    result = run_training(model=ModelSpec("resnet20", num_classes=4), loader=_loader(tiny_data, "torch"), engine=LOCAL,
                          schedule=ScheduleSpec(epochs=2, lr=0.05), storage_path=str(tmp_path / "runs"), name="t",
                          progress=False, max_steps_per_epoch=2)
    stamps = [result.history[0]["worker_start_time"]]
    for m in result.history:
        assert m["worker_start_time"] == stamps[0]
        stamps += [m["epoch_start_time"], m["train_end_time"], m["time"], m["checkpoint_end_time"]]
    assert stamps == sorted(stamps) and len(stamps) == 9
    assert sorted(os.listdir(tmp_path / "runs" / "t")) == ["checkpoint_000000", "checkpoint_000001"]
