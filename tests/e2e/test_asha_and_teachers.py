"""ASHA early stopping on the holdout and the `diverse` teacher policy, through one real `kesi run`.

In this process on the session's local Ray (2 CPUs, so two branch trials at a time, in grid order): an
untrained given baseline, one pruning iteration with four one-cycle branches of 2 epochs, two that
learn (max LR 0.1, 0.05) and two that cannot (1e-5, 1e-6); ASHA with a grace of 1 epoch on the holdout.
The two learning branches start first; the better one (0.1) is never behind at the rung, so it trains
to the end and hands over its snapshot (a trial is not stopped by its final report, which reaches
ASHA's max_t); the other is stopped there if it arrives second, behind the first. The last two reach
the rung with chance accuracy against the recorded ones and are stopped there: recorded as failed
"stopped early by ASHA after 1 epoch(s)", never a snapshot, never chosen. The `diverse` policy then
picks 2 teachers on the holdout's predictions, as `select_teachers` does with them. (`topk` runs in
tests/methods/test_methods.py's KESI run.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kesi_dist.checkpoint import save_checkpoint
from kesi_dist.cli import main
from kesi_dist.config import load_config, loader_spec
from kesi_dist.distill import select_teachers
from kesi_dist.models import build_model
from kesi_dist.stages.ensemble import _measure

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")
BEST, SECOND, STUCK = "iter1_b0", "iter1_b1", ("iter1_b2", "iter1_b3")


def test_asha_stops_the_branches_behind_on_the_holdout_and_diverse_picks_teachers(ray_local, tiny_data, tmp_path):
    baseline = tmp_path / "baseline.pt"
    save_checkpoint(baseline, build_model("resnet20", 4))
    run = tmp_path / "run"
    sets = ["data.source=prepared", f"data.prepared={tiny_data}", "data.resolution=16", "data.augment=none",
            f"baseline.checkpoint={baseline}", "prune.iterations=1", "retrain.epochs=2", "fixed_lr.enabled=false",
            "tune.branches=4", "tune.space.lr=[0.1,0.05,0.00001,0.000001]", "tune.asha=true",
            "tune.asha_grace_epochs=1", "distill.teachers=diverse", "distill.num_teachers=2", "distill.epochs=1",
            "distill.mode=online", "train.num_workers=0"]
    assert main(["run", SMOKE, "--output", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    m = json.loads((run / "manifest.json").read_text())

    failed = {e["event"].split()[1]: e["error"] for e in m["events"] if e["event"].endswith(" failed")}
    assert set(STUCK) <= set(failed) <= {*STUCK, SECOND}, failed
    assert all(why == "stopped early by ASHA after 1 epoch(s)" for why in failed.values()), failed
    finished = [b for b in (BEST, SECOND) if b not in failed]
    assert BEST in finished and set(finished) <= set(m["snapshots"]) and not set(failed) & set(m["snapshots"])
    assert not any((run / "snapshots" / f"{b}.pt").exists() for b in failed)
    assert m["snapshots"][BEST]["holdout_acc"] > 0.5  # well above chance (4 classes): what the others were behind
    chosen = m["stages"]["prune_1"]["chosen"]
    assert m["snapshots"][chosen]["holdout_acc"] == max(m["snapshots"][b]["holdout_acc"] for b in finished)

    # `diverse`: the teachers `select_teachers` picks from the candidates' holdout predictions.
    teachers = m["stages"]["ensemble"]["teachers"]
    names = [n for n, s in m["snapshots"].items() if s.get("arm") in ("baseline", "onecycle")]  # the recipe's order
    assert sorted(names) == ["baseline", *finished]
    assert len(teachers) == 2 and set(teachers) <= set(names)
    cfg = load_config(run / "config.yaml")
    preds = _measure([str(run / "snapshots" / f"{n}.pt") for n in names], vars(loader_spec(cfg, tiny_data)),
                     0, "holdout")["predictions"]
    candidates = {n: m["snapshots"][n]["holdout_acc"] for n in names}
    expect = select_teachers("diverse", chain=["baseline", chosen], candidates=candidates, k=2,
                             predictions=dict(zip(names, preds)))
    assert teachers == expect
    assert m["status"] == "complete" and "student" in m["snapshots"]
