"""The evaluation protocol on a real run: selection on the held-out split, numbers on the test split.

Two KESI runs (in this process, the session's local Ray, two one-cycle branches) on CIFAR-10 files in
the official format that differ only in the test split's labels: the holdout the manifest records,
every selection number and the branch chosen are the same, while the reported (test) accuracies move.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from kesi_dist.config import load_config
from tests.datafiles import write_cifar10

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _permute_test_labels(root: Path, ds) -> None:
    """Rewrite test_batch (written by tests.datafiles, kept in `ds`) with every label changed."""
    labels = np.asarray(ds.val_labels)
    batch = {"batch_label": "testing batch 1 of 1",
             "labels": [int(x) for x in (labels + 1 + np.arange(len(labels)) % 9) % 10],
             "data": ds.val_images.transpose(0, 3, 1, 2).reshape(len(labels), 3072).copy(),
             "filenames": [f"img_{i:05d}.png" for i in range(len(labels))]}
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)


def _run(root: Path, out: Path) -> dict:
    from kesi_dist.launch import run_method

    cfg = load_config(ROOT / "configs" / "kesi" / "smoke.yaml", [
        "data.source=cifar10", f"data.root={root}", "data.store_resolution=16", "data.resolution=16",
        "data.holdout=3", "baseline.epochs=1", "prune.iterations=1", "tune.branches=2", "retrain.epochs=1",
        "fixed_lr.enabled=false", "distill.enabled=false"])
    run_method(cfg, str(out), max_steps=3)
    return json.loads((out / "manifest.json").read_text())


def test_changing_the_test_labels_cannot_change_the_chosen_branch(ray_local, tmp_path):
    ds = write_cifar10(tmp_path / "a", train_per_batch=40, test=100)
    a, b = ds.root, tmp_path / "b"
    shutil.copytree(a, b)
    _permute_test_labels(b, ds)
    m_a, m_b = _run(a, tmp_path / "run_a"), _run(b, tmp_path / "run_b")

    held = m_a["stages"]["data"]["holdout"]
    assert held["size"] == 30 and held["per_class"] == [3, 3] and held["train_size"] == 170
    assert m_b["stages"]["data"]["holdout"] == held  # the same images held out
    assert m_a["stages"]["prune_1"]["chosen"] == m_b["stages"]["prune_1"]["chosen"]
    for name, snap in m_a["snapshots"].items():
        assert snap["holdout_acc"] == m_b["snapshots"][name]["holdout_acc"], name  # what selection compares
    # The test split really changed, and it is what val_acc reports: every label moved, so the baseline's
    # test accuracy differs between the runs.
    assert m_a["snapshots"]["baseline"]["val_acc"] != m_b["snapshots"]["baseline"]["val_acc"]
    branches = [n for n, s in m_a["snapshots"].items() if s.get("arm") == "onecycle"]
    chosen = m_a["stages"]["prune_1"]["chosen"]
    assert len(branches) == 2 and m_a["snapshots"][chosen]["holdout_acc"] == max(
        m_a["snapshots"][n]["holdout_acc"] for n in branches)

    report = json.loads((tmp_path / "run_a" / "report.json").read_text())
    assert report["protocol"] == {"selection": "holdout", "holdout_size": 30, "reported_on": "test",
                                  "holdout": 3, "holdout_sha256": held["sha256"]}
    assert report["one_cycle"]["holdout_acc"] == m_a["snapshots"][chosen]["holdout_acc"]
    md = (tmp_path / "run_a" / "report.md").read_text()
    assert "made on 30 training images held out from training" in md and "top-1 holdout (%)" in md
