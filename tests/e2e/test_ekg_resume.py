"""EKG's driver killed mid-search (SIGKILL to its process group) and `--resume`d: the search continues
from its last accepted step, not from the start, and ends where an uninterrupted search ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.killing import _manifest, run_until

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "ekg" / "smoke.yaml")
SETS = ("baseline.epochs=2", "finetune.epochs=1", "finetune.milestones=[]")

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1500)
def test_search_killed_after_three_steps_resumes_at_its_last_accepted_step(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"

    def three_steps(r: Path, m: dict) -> bool:
        return len(m["stages"].get("search", {}).get("steps") or []) >= 3

    at_kill, _ = run_until(run, three_steps, "search step 3", resume=False, config=SMOKE, sets=SETS)
    killed = at_kill["stages"]["search"]
    assert killed["status"] == "running" and not (run / "snapshots" / "ekg_init.pt").exists()
    recorded = killed["steps"]

    log = tmp_path / "resume.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "kesi_dist.cli", "run", SMOKE, "--output", str(run), *SETS,
                               "--resume"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    m = _manifest(run)
    search = m["stages"]["search"]
    resumed = search["resumed_from"]
    # The state is saved before the manifest notes a step: the kill may fall between the two.
    assert resumed in (len(recorded), len(recorded) + 1) and resumed >= 3
    assert f"search: resuming after step {resumed} of a stopped run" in text
    assert "step 1:" not in text and f"step {resumed + 1}:" in text  # no step taken twice
    assert search["steps"][:len(recorded)] == recorded  # what was accepted before the kill stands
    assert [s["step"] for s in search["steps"]] == list(range(1, len(search["steps"]) + 1))
    assert m["stages"]["baseline"]["end"] == at_kill["stages"]["baseline"]["end"]  # complete: reused
    assert m["status"] == "complete" and {"student", "ce_finetune", "uniform"} <= set(m["snapshots"])

    # An uninterrupted search of the same baseline on the same holdout, in one process, takes the same steps.
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
    from kesi_dist.data.loaders import split_tensors
    from kesi_dist.methods.ekg.search import SubnetSearch

    model = model_from_checkpoint(load_checkpoint(run / "snapshots" / "baseline.pt"))[0]
    images, labels = split_tensors(run / "data", "holdout", resolution=16, augment="cifar", backend="torch",
                                   holdout=0.1, holdout_seed=0)
    whole = SubnetSearch(model, images, labels, target_ratio=0.45, batch_size=256).run()
    assert [s.unit for s in whole] == [s["unit"] for s in search["steps"]]
    assert whole[-1].widths == search["widths"]
    assert torch.tensor([s.holdout_loss for s in whole]).allclose(
        torch.tensor([s["holdout_loss"] for s in search["steps"]]), rtol=1e-4)
