"""A branch whose loss really becomes NaN (max LR 1e6, not a mock) is stopped, reported and not retried.

`kesi run` in-process on the session's local Ray: a given (untrained) baseline so no baseline is
trained, one pruning iteration, 1 epoch per branch, no fixed-LR arm, no distillation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kesi_dist.checkpoint import save_checkpoint
from kesi_dist.cli import main
from kesi_dist.models import build_model

pytestmark = pytest.mark.slow  # each is a real (tiny) `kesi run` with Tune trials: ~30 s on an idle machine

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")


@pytest.fixture
def tiny_run(tiny_data, tmp_path):
    baseline = tmp_path / "baseline.pt"
    save_checkpoint(baseline, build_model("resnet20", 4))

    def args(lrs: str) -> list[str]:
        sets = ["data.source=prepared", f"data.prepared={tiny_data}", "data.resolution=16", "data.augment=none",
                f"baseline.checkpoint={baseline}", "prune.iterations=1", "retrain.epochs=1",
                "fixed_lr.enabled=false", "distill.enabled=false", "train.num_workers=0",
                "train.max_failures=2", f"tune.space.lr={lrs}"]
        return ["run", SMOKE, "--output", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]]

    return tmp_path / "run", args


def test_a_diverged_branch_is_reported_and_the_run_continues(ray_local, tiny_run, capsys):
    run, args = tiny_run
    assert main(args("[0.1,1.0e6]")) == 0
    out = capsys.readouterr()
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete"
    failed = m["stages"]["prune_1"]["failed"]
    assert list(failed) == ["iter1_b1"] and failed["iter1_b1"].startswith("diverged at epoch 1: training diverged")
    assert "iter1_b1 failed" in out.out and "diverged at epoch 1" in out.out
    assert m["stages"]["prune_1"]["chosen"] == "iter1_b0" and "iter1_b1" not in m["snapshots"]
    assert not (run / "snapshots" / "iter1_b1.pt").exists()
    # Reported once as the trial's final result: Tune did not retry it although max_failures=2.
    events = [e["event"] for e in m["events"]]
    assert events.count("branch iter1_b1 failed") == 1
    assert not [e for e in events if "retr" in e or "restart" in e]  # no "branch iter1_b1 retried"
    assert json.loads((run / "report.json").read_text())["one_cycle"]["snapshot"] == "iter1_b0"


def test_every_branch_diverged_fails_the_run(ray_local, tiny_run, capsys):
    run, args = tiny_run
    assert main(args("[1.0e6,2.0e6]")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: iteration 1: every branch failed (")
    assert "iter1_b0: diverged at epoch 1" in err[0] and "iter1_b1: diverged at epoch 1" in err[0]
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "failed" and m["stages"]["prune_1"]["status"] != "complete"
    assert set(m["snapshots"]) == {"baseline"}
