"""Driver loss: SIGKILL `kesi run` at four points of one run, `--resume` each time, then finish.

One chain on one run directory (to pay for one pipeline, not four). The first kill hits the driver
process alone, and its local Ray (GCS, raylet, workers, agents) must go down with it by itself; the
later kills take the driver's whole process group, as a crash of the machine's session would. At
    1. the baseline, after its first epoch checkpoint;
    2. between iterations: prune_1 complete, prune_2's branches still training;
    3. the soft-label pass, after the first shard file appeared;
    4. distillation, after its first epoch checkpoint;
then a last `--resume` runs to completion. Stages completed before a kill must be reused (same
recorded end time, snapshot files untouched), nothing registered twice, a stage killed mid-training
must go on at the epoch after its last checkpoint (not from scratch) and end with the weights of an
uninterrupted run, and the final report must have the structure, snapshot names, widths, params and
MACs of an uninterrupted run (`smoke_run`).
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

from tests.killing import _gone, _manifest, run_until

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")

pytestmark = pytest.mark.slow

# Fewer epochs than the smoke config wherever no kill point needs them: the baseline needs 2 (kill
# after the first), distillation 2 (likewise); retraining 1. Branches train inside their Tune trials
# as in the smoke config (a TorchTrainer per branch costs minutes on 2 cores).
CHAIN_SET = ("--set", "baseline.epochs=2", "--set", "retrain.epochs=1", "--set", "fixed_lr.epochs=1")
EXPECTED = {"baseline", "iter1_b0", "iter1_b1", "iter1_fixed", "iter2_b0", "iter2_b1", "iter2_fixed", "student"}


def _run_until(run: Path, when: Callable[[Path, dict], bool], what: str, resume: bool, **kw) -> tuple[dict, int]:
    return run_until(run, when, what, resume, config=SMOKE, sets=CHAIN_SET, **kw)


def _checkpoints(run: Path, name: str) -> list[Path]:
    return sorted((run / "train" / name).glob("**/checkpoint_*/model.pt"))


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


@pytest.mark.timeout(2400)  # ~6 min on an idle 2-core machine; several times that when it is shared
def test_driver_killed_at_four_points_then_resumed(tmp_path, request):
    run = tmp_path / "run"
    started = time.time()

    # 1. during the baseline, once its first epoch checkpoint is on disk: the driver process alone
    m1, first_driver = _run_until(run, lambda r, m: bool(_checkpoints(r, "baseline")), "baseline epoch 1",
                                  resume=False, driver_only=True)
    killed_at = time.time()
    # Ray's core fate-shares with the driver at once, and its workers (ray::...) soon after: the baseline's
    # task may finish the epoch it is in and write its checkpoint first, so the checkpoints are read after.
    _gone(first_driver, 60, only=("gcs_server", "raylet", "ray::"))
    assert m1["stages"]["baseline"]["status"] == "running" and not m1["snapshots"]
    done_epochs = len(_checkpoints(run, "baseline"))  # checkpoint folders: one per finished epoch (<= 2 kept)
    last_done = max(int(p.parent.name.split("_")[1]) for p in _checkpoints(run, "baseline")) + 1
    assert done_epochs >= 1
    f1 = _files(run)

    # 2. between iterations: prune_1 complete, prune_2 retraining (kill before all its branches finish)
    def in_prune_2(r: Path, m: dict) -> bool:
        return m["stages"].get("prune_2", {}).get("status") == "running" and any(
            n.startswith("iter2_") for n in m["snapshots"])

    m2, _ = _run_until(run, in_prune_2, "prune_2 branches", resume=True)
    _gone(first_driver, 240 - (time.time() - killed_at))  # the first driver's local Ray went down by itself
    assert m2["stages"]["baseline"]["attempts"] == 2  # resumed from its epoch checkpoint, then complete
    log2 = (run.parent / f"{run.name}-prune_2_branches.log").read_text()
    # It went on after its last checkpoint; an epoch it had finished was not trained again.
    assert f"baseline: resuming at epoch {last_done + 1} from its epoch-{last_done} checkpoint" in log2, log2[-3000:]
    assert f"baseline epoch {last_done}/2 " not in log2
    assert m2["stages"]["prune_1"]["status"] == "complete" and m2["stages"]["prune_2"]["status"] != "complete"
    assert not {"iter2_b0", "iter2_b1", "iter2_fixed"} <= set(m2["snapshots"]), "prune_2 finished before the kill"
    _reused(m1, f1, m2, _files(run))
    f2 = _files(run)

    # 3. during the soft-label pass, after the first shard was written
    def in_soft_labels(r: Path, m: dict) -> bool:
        return (m["stages"].get("soft_labels", {}).get("status") == "running"
                and any((r / "soft_labels").glob("*-values.npy")))

    m3, _ = _run_until(run, in_soft_labels, "soft-label pass", resume=True)
    assert m3["stages"]["prune_2"]["status"] == "complete" and not (run / "soft_labels" / "meta.json").exists()
    _reused(m2, f2, m3, _files(run))
    f3 = _files(run)

    # 4. during distillation, once its first epoch checkpoint is on disk
    def in_distill(r: Path, m: dict) -> bool:
        return m["stages"].get("distill", {}).get("status") == "running" and bool(_checkpoints(r, "distill"))

    m4, _ = _run_until(run, in_distill, "distillation epoch 1", resume=True)
    assert m4["stages"]["soft_labels"]["status"] == "complete" and "student" not in m4["snapshots"]
    _reused(m3, f3, m4, _files(run))
    f4 = _files(run)

    # 5. to completion
    done = subprocess.run([sys.executable, "-m", "kesi_dist.cli", "run", SMOKE, "--output", str(run), *CHAIN_SET,
                           "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = _manifest(run)
    assert final["status"] == "complete"
    _reused(m4, f4, final, _files(run))
    for text in ("baseline: complete, reused", "prune_1: complete, reused", "prune_2: complete, reused"):
        assert text in done.stdout, text
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

    # The report matches an uninterrupted run of the same config (structure and sizes; the
    # accuracies differ: fewer epochs here).
    ref_run, _, _ = request.getfixturevalue("smoke_run")  # after the chain: its failures show first
    report = json.loads((run / "report.json").read_text())
    ref = json.loads((ref_run / "report.json").read_text())
    assert set(report) == set(ref)
    assert [r["snapshot"] is None for r in (report[k] for k in ("baseline", "fixed_lr", "one_cycle", "student"))] \
        == [False] * 4
    assert [row["iteration"] for row in report["chain"]] == [row["iteration"] for row in ref["chain"]]
    mine = {s["name"]: s for s in report["snapshots"]}
    theirs = {s["name"]: s for s in ref["snapshots"]}
    assert set(mine) == set(theirs)
    for name in mine:
        for key in ("arch", "widths", "params", "macs", "parent" if name.endswith("fixed") else "arch"):
            assert mine[name][key] == theirs[name][key], (name, key)
    for key in ("baseline", "one_cycle", "fixed_lr", "student"):
        assert report[key]["macs"] == ref[key]["macs"] and report[key]["params"] == ref[key]["params"], key
    assert report["ensemble"]["teachers"][0] == "baseline" and len(report["ensemble"]["teachers"]) == 3
    for s in report["snapshots"]:  # sane: digits has 10 classes, so chance is 0.1
        assert 0.15 < s["val_acc"] <= 1.0, (s["name"], s["val_acc"])

    # The baseline killed after epoch 1 and resumed ends with the weights of one never interrupted:
    # `kesi train` of the same config (data + baseline stages) in another folder.
    plain = tmp_path / "uninterrupted"
    done = subprocess.run([sys.executable, "-m", "kesi_dist.cli", "train", SMOKE, "--output", str(plain), *CHAIN_SET],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from kesi_dist.checkpoint import load_checkpoint

    resumed = load_checkpoint(run / "snapshots" / "baseline.pt")["state_dict"]
    never = load_checkpoint(plain / "snapshots" / "baseline.pt")["state_dict"]
    assert resumed.keys() == never.keys()
    assert all(torch.equal(resumed[k], never[k]) for k in never), \
        [k for k in never if not torch.equal(resumed[k], never[k])][:5]
    print(f"\nchain of 4 kills + resume: {time.time() - started:.0f} s")
