"""Driver loss: SIGKILL `kesi run` at four points of one run, `--resume` each time, then finish.

One chain on one run directory (to pay for one pipeline, not four), with the smoke config exactly as
`smoke_run` runs it, so the finished run can be compared with that uninterrupted one bit for bit. The
first kill hits the driver process alone, and its local Ray (GCS, raylet, workers, agents) must go down
with it by itself; the later kills take the driver's whole process group, as a crash of the machine's
session would. At
    1. the baseline, after its first epoch checkpoint (`kesi status` is read first: a run in progress);
    2. a branch's training: prune_1 complete, a prune_2 branch past its first epoch checkpoint and not
       yet registered;
    3. the soft-label pass, after the first shard file appeared;
    4. distillation, after its first epoch checkpoint;
then a last `--resume` runs to completion. Stages completed before a kill must be reused (same
recorded end time, snapshot files untouched), nothing registered twice, a stage killed mid-training
must go on at the epoch after its last checkpoint (the manifest's `resumed_at`, asserted for the
baseline, the branch and the student), and every snapshot of the finished run, the student included,
must hold the weights of the uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from kesi_dist.checkpoint import load_checkpoint
from kesi_dist.status import format_status, run_status
from tests.killing import _gone, _manifest, run_until

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")

pytestmark = pytest.mark.slow

EXPECTED = {"baseline", "iter1_b0", "iter1_b1", "iter1_fixed", "iter2_b0", "iter2_b1", "iter2_fixed", "student"}


def _run_until(run: Path, when: Callable[[Path, dict], bool], what: str, resume: bool, **kw) -> tuple[dict, int]:
    return run_until(run, when, what, resume, config=SMOKE, **kw)


def _checkpoints(run: Path, *where: str) -> list[Path]:
    return sorted(run.joinpath("train", *where).glob("**/checkpoint_*/model.pt"))


def _epochs_done(run: Path, *where: str) -> int:
    """Epochs a training run finished, from its epoch checkpoint folders (checkpoint_00000 = epoch 1)."""
    return max((int(p.parent.name.split("_")[1]) + 1 for p in _checkpoints(run, *where)), default=0)


def _files(run: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (run / "snapshots").glob("*")}


def _reused(before: dict, files_before: dict, after: dict, files_after: dict) -> None:
    """What was complete before a kill is untouched after the resume."""
    for stage, st in before["stages"].items():
        if st["status"] == "complete":
            assert after["stages"][stage]["end"] == st["end"], f"stage {stage} was redone"
            assert after["stages"][stage]["attempts"] == st["attempts"], stage
    for name, entry in before["snapshots"].items():
        assert after["snapshots"][name]["end"] == entry["end"], f"snapshot {name} re-registered"
    for name, mtime in files_before.items():
        # A branch whose trial wrote its file but was killed before the driver registered it is not
        # complete: its trial runs again on resume (from its last epoch checkpoint) and rewrites it.
        if name.removesuffix(".pt") in before["snapshots"] or name.endswith("_init.pt"):
            assert files_after[name] == mtime, f"{name} rewritten"


@pytest.mark.timeout(2400)  # ~5 min on an idle 2-core machine; several times that when it is shared
def test_driver_killed_at_four_points_then_resumed(tmp_path, request):
    run = tmp_path / "run"
    started = time.time()
    status: list[dict] = []

    # 1. during the baseline, once its first epoch checkpoint is on disk: the driver process alone. Just
    # before the kill, `kesi status` (its function, in this process) reads the run in progress.
    def in_baseline(r: Path, m: dict) -> bool:
        if not (_checkpoints(r, "baseline") and (r / "progress" / "baseline.json").exists()):
            return False
        status.append(run_status(str(r)))
        return True

    m1, first_driver = _run_until(run, in_baseline, "baseline epoch 1", resume=False, driver_only=True)
    killed_at = time.time()
    # Ray's core fate-shares with the driver at once, and its workers (ray::...) soon after: the baseline's
    # task may finish the epoch it is in and write its checkpoint first, so the checkpoints are read after.
    _gone(first_driver, 60, only=("gcs_server", "raylet", "ray::"))
    assert m1["stages"]["baseline"]["status"] == "running" and not m1["snapshots"]
    baseline_done = _epochs_done(run, "baseline")
    assert baseline_done >= 1
    f1 = _files(run)
    text = format_status(status[0])
    assert "·  running (started" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("baseline  epoch"))
    assert "/4" in line and "holdout acc" in line and "node " in line and "ETA" in line, line
    stage = next(ln for ln in text.splitlines() if ln.strip().startswith("baseline ") and "epoch" not in ln)
    assert "running" in stage

    # 2. during a branch's training: prune_1 complete, a prune_2 branch past its first epoch checkpoint and
    # not registered (its group is killed before the trial ends, or after it wrote its file but before the
    # driver registered it: either way the branch is not complete)
    def in_branch(r: Path, m: dict) -> bool:
        return m["stages"].get("prune_2", {}).get("status") == "running" and any(
            b not in m["snapshots"] and _checkpoints(r, "prune_2", b) for b in ("iter2_b0", "iter2_b1", "iter2_fixed"))

    m2, _ = _run_until(run, in_branch, "a prune_2 branch", resume=True)
    _gone(first_driver, 240 - (time.time() - killed_at))  # the first driver's local Ray went down by itself
    assert m2["stages"]["baseline"]["attempts"] == 2  # resumed from its epoch checkpoint, then complete
    assert m2["snapshots"]["baseline"]["resumed_at"] == [baseline_done]  # the epoch after its last checkpoint
    log2 = (run.parent / f"{run.name}-a_prune_2_branch.log").read_text()
    assert f"baseline: resuming at epoch {baseline_done + 1} from its epoch-{baseline_done} checkpoint" in log2
    assert f"baseline epoch {baseline_done}/4 " not in log2  # an epoch it had finished was not trained again
    assert m2["stages"]["prune_1"]["status"] == "complete" and m2["stages"]["prune_2"]["status"] != "complete"
    in_flight = {b: _epochs_done(run, "prune_2", b) for b in ("iter2_b0", "iter2_b1", "iter2_fixed")
                 if b not in m2["snapshots"]}
    assert any(in_flight.values()), in_flight
    _reused(m1, f1, m2, _files(run))
    f2 = _files(run)

    # 3. during the soft-label pass, after the first shard was written
    def in_soft_labels(r: Path, m: dict) -> bool:
        return (m["stages"].get("soft_labels", {}).get("status") == "running"
                and any((r / "soft_labels").glob("*-values.npy")))

    m3, _ = _run_until(run, in_soft_labels, "soft-label pass", resume=True)
    assert m3["stages"]["prune_2"]["status"] == "complete" and not (run / "soft_labels" / "meta.json").exists()
    for b, done_epochs in in_flight.items():  # each killed branch went on after its last epoch checkpoint
        assert m3["snapshots"][b]["resumed_at"] == [done_epochs], (b, m3["snapshots"][b])
    _reused(m2, f2, m3, _files(run))
    f3 = _files(run)

    # 4. during distillation, once its first epoch checkpoint is on disk
    def in_distill(r: Path, m: dict) -> bool:
        return m["stages"].get("distill", {}).get("status") == "running" and bool(_checkpoints(r, "distill"))

    m4, _ = _run_until(run, in_distill, "distillation epoch 1", resume=True)
    assert m4["stages"]["soft_labels"]["status"] == "complete" and "student" not in m4["snapshots"]
    distill_done = _epochs_done(run, "distill")
    assert distill_done >= 1
    _reused(m3, f3, m4, _files(run))
    f4 = _files(run)

    # 5. to completion
    done = subprocess.run([sys.executable, "-m", "kesi_dist.cli", "run", SMOKE, "--output", str(run), "--resume"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = _manifest(run)
    assert final["status"] == "complete"
    _reused(m4, f4, final, _files(run))
    for text in ("baseline: complete, reused", "prune_1: complete, reused", "prune_2: complete, reused"):
        assert text in done.stdout, text
    assert f"distill: resuming at epoch {distill_done + 1} from its epoch-{distill_done} checkpoint" in done.stderr + done.stdout
    assert final["snapshots"]["student"]["resumed_at"] == [distill_done]
    assert sum(e["event"] == "resume" for e in final["events"]) == 4
    assert final["stages"]["distill"]["attempts"] == 2 and final["stages"]["soft_labels"]["attempts"] == 2

    # Nothing lost, nothing registered twice, no half-written file left.
    assert set(final["snapshots"]) == EXPECTED
    on_disk = {p.stem for p in (run / "snapshots").glob("*.pt")}
    assert on_disk == EXPECTED | {"iter1_init", "iter1_fixed_init", "iter2_init", "iter2_fixed_init"}
    # A write the kill interrupted left a temp file; the next write of that file removed it.
    assert not [p for p in (run, run / "snapshots", run / "soft_labels", run / "data")
                for p in p.glob(".*.tmp") if p.is_file()]
    assert sum(e["event"] == "snapshot iter1_b0" for e in final["events"]) == 1

    # Every snapshot, the student included, is the uninterrupted run's, bit for bit; so are the report's
    # sizes and accuracies.
    ref_run, _, _ = request.getfixturevalue("smoke_run")  # after the chain: its failures show first
    ref_manifest = _manifest(ref_run)
    assert set(ref_manifest["snapshots"]) == EXPECTED
    for name in sorted(EXPECTED):
        mine = load_checkpoint(run / "snapshots" / f"{name}.pt")
        theirs = load_checkpoint(ref_run / "snapshots" / f"{name}.pt")
        assert mine["widths"] == theirs["widths"], name
        a, b = mine["state_dict"], theirs["state_dict"]
        assert a.keys() == b.keys(), name
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (name, differ[:5])
        for key in ("val_acc", "holdout_acc", "params", "macs"):
            assert final["snapshots"][name][key] == ref_manifest["snapshots"][name][key], (name, key)
    report = json.loads((run / "report.json").read_text())
    ref = json.loads((ref_run / "report.json").read_text())
    assert set(report) == set(ref)
    for key in ("baseline", "one_cycle", "fixed_lr", "student"):
        assert report[key] == ref[key], key
    assert report["ensemble"] == ref["ensemble"] and report["chain"] == ref["chain"]
    print(f"\nchain of 4 kills + resume: {time.time() - started:.0f} s")
