"""`kesi train CONFIG`: the data and baseline stages of a run: <output>/snapshots/baseline.pt, registered in
the run's manifest, so that `kesi run --resume` of the same config continues from it."""

from __future__ import annotations

import json

import pytest
import yaml

from kesi_dist.checkpoint import load_checkpoint
from kesi_dist.cli import main

CONFIG = {
    "seed": 0,
    "model": {"arch": "resnet20"},
    "data": {"source": "synthetic", "resolution": 16, "batch_size": 64, "num_workers": 1,
             "synthetic": {"num_train": 256, "num_val": 128, "num_classes": 4, "difficulty": 0.1}},
    "baseline": {"epochs": 2, "lr": 0.05, "schedule": "onecycle"},
    "train": {"num_workers": 0},
}


@pytest.mark.slow
def test_kesi_train_writes_a_baseline_and_guards_it(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out)]) == 0
    assert "baseline: val acc" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "snapshots" / "baseline.pt")
    assert ckpt["arch"] == "resnet20" and ckpt["num_classes"] == 4 and ckpt["metrics"]["epoch"] == 1
    assert (out / "data" / "meta.json").is_file() and (out / "config.yaml").is_file()
    assert list((out / "tensorboard" / "baseline").glob("events.out.tfevents.*"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and set(m["stages"]) == {"data", "baseline"}
    assert m["snapshots"]["baseline"]["val_acc"] > 0.25 and m["snapshots"]["baseline"]["macs"] > 0

    # a second run must not silently overwrite the baseline; --resume reuses it
    before = (out / "snapshots" / "baseline.pt").read_bytes()
    assert main(["train", str(cfg), "--output", str(out)]) == 2
    assert "already holds a complete run" in capsys.readouterr().err
    assert main(["train", str(cfg), "--output", str(out), "--resume"]) == 0
    assert "baseline: complete, reused" in capsys.readouterr().out
    assert (out / "snapshots" / "baseline.pt").read_bytes() == before

    # resuming with a different schedule is refused, naming what changed, and changes nothing
    assert main(["train", str(cfg), "--output", str(out), "--resume", "--set", "baseline.epochs=3"]) == 2
    assert "different config (changed: baseline.epochs)" in capsys.readouterr().err
    assert (out / "snapshots" / "baseline.pt").read_bytes() == before


def test_kesi_train_needs_an_output(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    assert main(["train", str(cfg)]) == 2
    assert "--output" in capsys.readouterr().err


@pytest.mark.slow
def test_kesi_train_on_a_storage_uri_then_kesi_run_continues_from_its_baseline(tmp_path, capsys):
    """`kesi train --output file://...` (any pyarrow URI): the same run folder; `kesi run --resume` of the
    same config on it reuses the data and the baseline and goes on with the method."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "method": {
        "name": "kesi", "prune": {"iterations": 1, "stage_ratios": [0.5, 0.5, 0.5]}, "retrain": {"epochs": 1},
        "fixed_lr": {"enabled": False}, "tune": {"branches": 1}, "distill": {"enabled": False}}}))
    uri = f"file://{tmp_path / 'bucket' / 'run'}"
    assert main(["train", str(cfg), "--output", uri]) == 0
    assert "baseline: val acc" in capsys.readouterr().out
    assert load_checkpoint(f"{uri}/snapshots/baseline.pt")["arch"] == "resnet20"
    trained = json.loads((tmp_path / "bucket" / "run" / "manifest.json").read_text())["snapshots"]["baseline"]
    assert main(["run", str(cfg), "--output", uri, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "baseline: complete, reused" in out and "prune_1" in out
    m = json.loads((tmp_path / "bucket" / "run" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["snapshots"]["baseline"]["end"] == trained["end"]
    assert "iter1_b0" in m["snapshots"] and (tmp_path / "bucket" / "run" / "report.md").is_file()
