"""The plain-PyTorch training core: one epoch, mask constraints, divergence, tasks, schedules, TensorBoard."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kesi_dist.errors import RunError, UsageError
from kesi_dist.pruning import MaskConstraint, mwp_masks
from kesi_dist.train import (
    DivergedError, ScalarWriter, build_optimizer, build_scheduler, current_lr, evaluate, train_epoch,
)
from kesi_dist.train.engines import load_engine_state, save_engine_state, wrap_model


class TinyNet(nn.Module):
    """Two convs + BN + linear: enough for masks (conv weights) and fast on CPU."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def blobs(n: int = 256, classes: int = 4, seed: int = 0, batch: int = 32):
    """Class-dependent mean colour + noise: linearly separable, so a few epochs suffice."""
    centers = torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 0, 2], [-2, -2, -2]])[:classes].view(classes, 3, 1, 1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = centers[labels] + 0.3 * torch.randn(n, 3, 8, 8, generator=g)
    return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)]


def test_train_epoch_learns_and_reports_metrics():
    torch.manual_seed(0)
    model, data, val = TinyNet(), blobs(), blobs(seed=1)
    opt = build_optimizer(model.parameters(), optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-4)
    sched = build_scheduler(opt, schedule="onecycle", epochs=8, steps_per_epoch=len(data), lr=0.2)
    before = evaluate(model, val)
    losses = [train_epoch(model, data, opt, sched)["train/loss"] for _ in range(8)]
    after = evaluate(model, val)
    m = train_epoch(model, data, opt, None, max_steps=3)
    assert set(m) >= {"train/loss", "train/acc", "images_per_s", "epoch_s"}
    assert m["steps"] == 3 and m["images"] == 96 and m["images_per_s"] > 0
    assert losses[-1] < 0.5 * losses[0]
    assert after["val/acc"] > 0.85 > before["val/acc"] + 0.3  # chance is 0.25
    assert set(after) == {"val/loss", "val/acc"}


@pytest.mark.parametrize("opt_kwargs", [
    dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    dict(optimizer="adam", lr=1e-2, weight_decay=1e-3),
])
def test_masked_weights_stay_zero(opt_kwargs):
    torch.manual_seed(0)
    model, data = TinyNet(), blobs()
    masks = mwp_masks(model, 0.5)
    opt = build_optimizer(model.parameters(), **opt_kwargs)
    for _ in range(2):
        train_epoch(model, data, opt, None, constraints=[MaskConstraint(masks)])
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][mask == 0] == 0).all(), name
        assert (params[name][mask == 1] != 0).float().mean() > 0.9, name  # the rest did train
    assert any(s.get("momentum_buffer", s.get("exp_avg")) is not None for s in opt.state.values())


def test_nan_loss_raises_before_the_update():
    torch.manual_seed(0)
    model, data = TinyNet(), blobs(batch=64)
    data[1] = (torch.full_like(data[1][0], float("nan")), data[1][1])
    opt = build_optimizer(model.parameters(), lr=0.1)
    with pytest.raises(DivergedError, match="diverged.*step 2") as info:
        snapshot = None

        def watch():
            nonlocal snapshot
            for i, batch in enumerate(data):
                if i == 1:
                    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
                yield batch

        train_epoch(model, watch(), opt, None)
    assert isinstance(info.value, RunError)  # the CLI prints it as one line, exit code 1
    for k, v in model.state_dict().items():  # the NaN batch was never applied
        assert torch.equal(v, snapshot[k]) or k.endswith("num_batches_tracked") or "running" in k


def test_huge_lr_diverges_with_a_clear_error():
    torch.manual_seed(0)
    model, data = TinyNet(), blobs()
    opt = build_optimizer(model.parameters(), lr=1e12, momentum=0.9)
    with pytest.raises(DivergedError, match="lower the learning rate"):
        for _ in range(3):
            train_epoch(model, data, opt, None)


def test_a_task_owns_the_forward_and_its_parts_are_reported():
    """A task that runs two sub-networks per step (as SWP's sandwich rule does) through the same loop."""
    from kesi_dist.train.tasks import TaskOutput

    torch.manual_seed(0)
    model, data = TinyNet(), blobs()
    calls = []

    class TwoViews:  # the full batch, then a second forward on half of it, one loss
        needs_indices = False

        def set_epoch(self, epoch):
            pass

        def __call__(self, model, images, labels, indices):
            calls.append((images.shape, labels.shape, indices))
            full = model(images)
            half = model(images[: len(images) // 2])
            main = nn.functional.cross_entropy(full, labels)
            extra = nn.functional.cross_entropy(half, labels[: len(images) // 2])
            return TaskOutput(main + extra, full, {"extra_loss": extra})

    opt = build_optimizer(model.parameters(), optimizer="adam", lr=1e-2, weight_decay=0)
    first = train_epoch(model, data, opt, None, task=TwoViews())
    second = train_epoch(model, data, opt, None, task=TwoViews())
    assert calls[0] == (torch.Size([32, 3, 8, 8]), torch.Size([32]), None)
    assert len(calls) == 2 * len(data)
    assert 0 < first["train/extra_loss"] < first["train/loss"]
    assert second["train/loss"] < first["train/loss"]


def test_distillation_task_with_online_teachers():
    from kesi_dist.distill import OnlineTeachers, kd_loss
    from kesi_dist.train.tasks import Distillation

    torch.manual_seed(0)
    model, data = TinyNet(), blobs()
    teacher = TinyNet()
    task = Distillation(OnlineTeachers([teacher], temperature=4.0, num_classes=4), temperature=4.0, alpha=0.25)
    images, labels = data[0]
    out = task(model, images, labels, None)
    with torch.no_grad():
        want = kd_loss(model(images), torch.softmax(teacher(images) / 4.0, 1), labels, temperature=4.0, alpha=0.25)
    assert torch.allclose(out.loss, want["loss"]) and set(out.parts) == {"kd_loss", "task_loss"}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training  # frozen
    soft_only = Distillation(OnlineTeachers([teacher], temperature=1.0, num_classes=4), temperature=1.0)
    opt = build_optimizer(model.parameters(), optimizer="adam", lr=1e-3, weight_decay=0)
    history = [train_epoch(model, data, opt, None, task=soft_only)["train/kd_loss"] for _ in range(3)]
    assert history[-1] < history[0]  # the student moves towards the teacher


def _lrs(schedule: str, epochs: int, steps: int, **kw) -> list[float]:
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, schedule=schedule, epochs=epochs, steps_per_epoch=steps, **kw)
    out = []
    for _ in range(epochs * steps):
        out.append(current_lr(opt))
        opt.step()
        sched.step()
    return out


def test_onecycle_matches_the_paper_restart():
    # METHOD.md: max 0.1, div 10, pct 0.1, final div 100 over 40 epochs: 0.01 -> 0.1 at epoch 4 -> 1e-4.
    lrs = _lrs("onecycle", 40, 10, lr=0.1, div_factor=10, pct_start=0.1, final_div_factor=100)
    assert lrs[0] == pytest.approx(0.01)
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == pytest.approx(40, abs=1)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05)
    assert all(a <= b for a, b in zip(lrs[:39], lrs[1:40]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[40:], lrs[41:]))  # cosine anneal falls


def test_multistep_and_constant():
    lrs = _lrs("multistep", 6, 5, lr=0.1, milestones=[2, 4], gamma=0.1)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.01) and lrs[20] == pytest.approx(0.001) and lrs[-1] == pytest.approx(0.001)
    assert set(_lrs("constant", 2, 3, lr=0.001)) == {0.001}


def test_bad_optimizer_or_schedule_is_a_usage_error():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(UsageError, match="optimizer"):
        build_optimizer(p, optimizer="lbfgs")
    with pytest.raises(UsageError, match="nesterov"):
        build_optimizer(p, momentum=0, nesterov=True)
    with pytest.raises(UsageError, match="schedule"):
        build_scheduler(build_optimizer(p), schedule="cyclic", epochs=1, steps_per_epoch=1, lr=0.1)


def test_single_process_state_roundtrip(tmp_path):
    """Optimizer + scheduler state saved with the checkpoint resume to the identical trajectory."""
    torch.manual_seed(0)
    data = blobs()

    def setup():
        torch.manual_seed(0)
        model = TinyNet()
        opt = build_optimizer(model.parameters(), lr=0.05, momentum=0.9)
        sched = build_scheduler(opt, schedule="onecycle", epochs=3, steps_per_epoch=len(data), lr=0.05)
        return model, wrap_model(model, opt, engine="ddp", device=torch.device("cpu")), sched

    model, w, sched = setup()
    ref = [train_epoch(w.model, data, w.optimizer, sched)["train/loss"] for _ in range(3)]

    model, w, sched = setup()
    train_epoch(w.model, data, w.optimizer, sched)
    save_engine_state(w, tmp_path, rank=0)
    torch.save({"s": sched.state_dict(), "m": model.state_dict()}, tmp_path / "rest.pt")
    model, w, sched = setup()
    rest = torch.load(tmp_path / "rest.pt", weights_only=True)
    model.load_state_dict(rest["m"])
    sched.load_state_dict(rest["s"])
    load_engine_state(w, tmp_path, rank=0)
    resumed = [train_epoch(w.model, data, w.optimizer, sched)["train/loss"] for _ in range(2)]
    assert resumed == pytest.approx(ref[1:], rel=1e-6)


def test_tensorboard_scalars_and_hparams_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with ScalarWriter(tmp_path / "tb") as w:
        for step in (1, 2, 3):
            w.scalars({"train/loss": 1.0 / step, "val/acc": 0.2 * step, "lr": 0.1, "note": "skipped",
                       "bad": float("nan")}, step=step)
        w.hparams({"lr": 0.1, "pct_start": 0.2, "arch": "resnet20"}, {"val/acc": 0.6})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/acc", "lr"} <= set(tags) and "note" not in tags and "bad" not in tags
    assert [e.step for e in acc.Scalars("val/acc")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert "hparam/val/acc" in tags
    disabled = ScalarWriter(tmp_path / "never", enabled=False)
    disabled.scalars({"x": 1.0}, step=1)
    assert not (tmp_path / "never").exists()


def test_worker_failures_surface_as_one_line_kesi_errors():
    from ray.train import WorkerGroupError

    from kesi_dist.runtime.trainer import _backend, _failure_message
    from kesi_dist.train.spec import EngineSpec

    err = WorkerGroupError("rank 1 failed", {1: RuntimeError("Traceback ...\nDivergedError: training diverged: "
                                                             "loss is nan at step 3 of the epoch (lr 10); lower it")})
    cls, line = _failure_message(err)
    assert cls is DivergedError and line.startswith("training diverged: loss is nan at step 3")
    cls, line = _failure_message(WorkerGroupError("x", {0: UsageError("data.batch_size 10 is not divisible")}))
    assert cls is UsageError and "batch_size" in line
    cls, line = _failure_message(WorkerGroupError("x", {0: OSError("Traceback\n  ...\nOSError: disk full")}))
    assert cls is RunError and line == "OSError: disk full"
    assert _backend(EngineSpec(gpus_per_worker=0)) == "gloo"
    assert _backend(EngineSpec(gpus_per_worker=1, num_workers=4)) == "nccl"
    assert _backend(EngineSpec(gpus_per_worker=0.5, num_workers=2)) == "gloo"  # may share a GPU
