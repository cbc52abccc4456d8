"""`kesi train` with a torchvision network and the user's own weights (issue 26): the weights are the
baseline as they are (baseline.epochs: 0), a head for other classes is replaced and fine-tuned, and a file
that does not fit is refused before anything runs."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
import yaml

from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
from kesi_dist.cli import main

RES = 16
CONFIG = {
    "seed": 0,
    "model": {"arch": "torchvision:resnet18"},
    "data": {"source": "synthetic", "resolution": RES, "batch_size": 64, "num_workers": 1,
             "synthetic": {"num_train": 256, "num_val": 128, "num_classes": 4, "difficulty": 0.1}},
    "baseline": {"epochs": 0, "lr": 0.01, "schedule": "onecycle"},
    "train": {"num_workers": 0},
    "method": {"name": "kesi", "prune": {"stage_ratios": [0.1, 0.2, 0.3, 0.3]}},
}


def _weights(path, classes: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=classes).eval()
    torch.save(net.state_dict(), path)
    return net


@pytest.mark.slow
def test_kesi_train_takes_the_users_weights_as_the_baseline(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    source = _weights(tmp_path / "mine.pth", 4)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "--set", f"model.weights={tmp_path / 'mine.pth'}"]) == 0
    assert "loaded 122 tensors" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "snapshots" / "baseline.pt")
    assert (ckpt["arch"], ckpt["num_classes"], ckpt["options"]) == ("torchvision:resnet18", 4, {"resolution": RES})
    model, _ = model_from_checkpoint(ckpt)
    x = torch.randn(3, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))  # evaluated as it is, not trained
    snap = json.loads((out / "manifest.json").read_text())["snapshots"]["baseline"]
    assert 0 <= snap["val_acc"] <= 1 and snap["attempts"] == 0

    # weights for 10 classes: refused as the baseline (their head must be trained), before any folder exists
    _weights(tmp_path / "imagenet_like.pth", 10, seed=1)
    refused = tmp_path / "refused"
    args = ["train", str(cfg), "--output", str(refused), "--set", f"model.weights={tmp_path / 'imagenet_like.pth'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its head is for 10 classes, the data has 4" in err[0]
    assert "set baseline.epochs >= 1" in err[0] and not refused.exists()

    # ... and fine-tuned with a new head for 1 epoch
    tuned = tmp_path / "tuned"
    assert main([*args[:3], str(tuned), *args[4:], "--set", "baseline.epochs=1"]) == 0
    assert "a new head is trained" in capsys.readouterr().out
    init = load_checkpoint(tuned / "snapshots" / "baseline_init.pt")
    assert init["head_replaced"] is True and init["num_classes"] == 4
    assert load_checkpoint(tuned / "snapshots" / "baseline.pt")["metrics"]["epoch"] == 0

    # a file of another network: refused naming the first mismatching key, before any folder exists
    torch.save(torchvision.models.mobilenet_v2(num_classes=4).state_dict(), tmp_path / "mbv2.pth")
    other = tmp_path / "other"
    assert main(["train", str(cfg), "--output", str(other), "--set", f"model.weights={tmp_path / 'mbv2.pth'}"]) == 2
    err = capsys.readouterr().err
    assert "does not fit torchvision:resnet18: the file has no 'conv1.weight'" in err and not other.exists()
