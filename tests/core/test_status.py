"""`kesi status` never crashes: an EKG or SWP search under a latency budget (its stage records no MACs target),
a stage that failed or was interrupted and then completed on `--resume` (no stale error), a progress
file or report.json that is not what it should be (skipped with a warning line, the rest is shown), and
the driver holding the run. A damaged manifest or config.yaml is one error line: rows of
tests/e2e/test_bad_input.py."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kesi_dist.cli import main
from kesi_dist.runs import RunContext, open_run
from kesi_dist.runs.lease import Lease
from kesi_dist.status import format_status, run_status


def _run(tmp_path, method: str = "ekg") -> RunContext:
    run, manifest = open_run(str(tmp_path / "run"), {"method": {"name": method}, "model": {"arch": "resnet20"}},
                             resume=False)
    return RunContext(run, manifest, resolution=8)


def test_an_ekg_search_under_a_latency_budget(tmp_path, capsys):
    """The steps as EKG's search stage records them (`_record` of real `SubnetSearch` steps with a cost)."""
    from kesi_dist.methods.ekg.search import SubnetSearch
    from kesi_dist.methods.ekg.search_stage import _record
    from kesi_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4).eval()
    # One 16-image holdout batch and a target of 80% (~11 steps): what status prints does not depend on either.
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    search = SubnetSearch(model, x, y, target_ratio=0.8, batch_size=16, cost=lambda w: float(sum(w)))
    ctx = _run(tmp_path)
    with ctx.stage("search", target_macs_ratio=None, target_latency_ratio=0.8):
        steps = [_record(s, {0}, 0.1) for s in search.run()]
        ctx.note("search", steps=steps)
        status = run_status(ctx.run.root)
    row = status["stages"][0]
    last = steps[-1]
    assert row["detail"] == (f"{len(steps)} steps, MACs {100 * last['macs_ratio']:.1f}%, predicted latency "
                             f"{100 * last['budget_ratio']:.1f}% (target 80% of the latency)")
    assert last["budget_ratio"] <= 0.8
    assert main(["status", ctx.run.root]) == 0
    assert "(target 80% of the latency)" in capsys.readouterr().out
    ctx.manifest.stages["search"]["target_latency_ratio"] = None  # a MACs target, as before
    ctx.manifest.stages["search"]["target_macs_ratio"] = 0.45
    ctx.manifest.save()
    assert run_status(ctx.run.root)["stages"][0]["detail"].endswith("(target 45%)")


def test_an_swp_search_under_a_latency_budget(tmp_path, capsys):
    """SWP's search stage as it records itself (`Budget.record` of a latency budget, then generations)."""
    from kesi_dist.budget import LatencyBudget

    ctx = _run(tmp_path, "swp")
    with ctx.stage("search", **LatencyBudget(0.6, "method.target_latency").record()):
        ctx.note("search", generations=[{"generation": 0, "best": 0.4, "mean": 0.3, "evaluated": 12},
                                        {"generation": 1, "best": 0.5, "mean": 0.4, "evaluated": 24}])
        row = run_status(ctx.run.root)["stages"][0]
    assert row["detail"] == "generation 1, best proxy 50.00% (target 60% of the latency)"
    assert main(["status", ctx.run.root]) == 0 and "(target 60% of the latency)" in capsys.readouterr().out


def test_a_stage_redone_on_resume_shows_no_stale_error_and_an_interrupted_one_says_so(tmp_path):
    from kesi_dist.errors import Interrupted, RunError

    ctx = _run(tmp_path)
    with pytest.raises(RunError):
        with ctx.stage("baseline"):
            raise RunError("diverged at epoch 2")
    with pytest.raises(Interrupted):
        with ctx.stage("finetune"):
            raise Interrupted("SIGTERM")
    rows = {r["stage"]: r for r in run_status(ctx.run.root)["stages"]}
    assert rows["baseline"]["status"] == "failed" and rows["baseline"]["detail"] == "diverged at epoch 2"
    assert rows["finetune"]["status"] == "interrupted" and "interrupted by SIGTERM" in rows["finetune"]["detail"]
    for name in ("baseline", "finetune"):  # --resume: both redone, to completion
        with ctx.stage(name):
            pass
    rows = {r["stage"]: r for r in run_status(ctx.run.root)["stages"]}
    for name in ("baseline", "finetune"):
        assert rows[name]["status"] == "complete" and rows[name]["attempts"] == 2 and "detail" not in rows[name]
        assert "error" not in ctx.manifest.stages[name] and "interrupted" not in ctx.manifest.stages[name]
    events = [e["event"] for e in ctx.manifest.data["events"]]
    assert "failed baseline" in events and "interrupted finetune" in events  # the history stays in the events


@pytest.mark.parametrize("progress,problem", [
    ({"epoch": "three", "epochs": 4, "metrics": {}, "updated": 0}, "epoch: 'three' is a str, expected a whole number"),
    ({"epoch": 1, "epochs": 4, "updated": 0}, "metrics: missing"),
    ({"epoch": 1, "epochs": 4, "metrics": {"val/acc": "high"}, "updated": 0},
     "metrics.val/acc: 'high' is a str, expected a number"),
    ([1, 2], "(top level): a list, expected a mapping"),
])
def test_a_bad_progress_file_is_skipped_with_one_warning_line(tmp_path, progress, problem, capsys):
    ctx = _run(tmp_path)
    path = tmp_path / "run" / "progress"
    path.mkdir()
    (path / "student.json").write_text(json.dumps(progress))
    (path / "branch.json").write_text(json.dumps({"epoch": 1, "epochs": 4, "metrics": {"val/acc": 0.5},
                                                  "updated": 0, "epoch_times": [1.0, 3.0]}))
    status = run_status(ctx.run.root)
    assert [t["name"] for t in status["training"]] == ["branch"] and status["training"][0]["eta_s"] == 6.0
    assert status["problems"] == [f"{path / 'student.json'}: {problem}; skipped"]
    assert main(["status", ctx.run.root]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"warning: {path / 'student.json'}: {problem}; skipped"


def test_a_mistyped_report_row_is_skipped_and_the_driver_is_named(tmp_path):
    ctx = _run(tmp_path)
    ctx.complete()
    (tmp_path / "run" / "report.json").write_text(json.dumps({
        "student": {"val_acc": 0.9, "macs": 1e6}, "baseline": {"val_acc": "n/a", "macs": 2e6}}))
    lease = Lease.acquire(ctx.run.root)
    try:
        status = run_status(ctx.run.root)
        text = format_status(status)
    finally:
        lease.release()
    assert [r["row"] for r in status["report_rows"]] == ["student"]
    assert status["problems"] == [f"{tmp_path / 'run' / 'report.json'}: baseline.val_acc: 'n/a' is a str, expected "
                                  "a number; row skipped"]
    assert re.search(r"driver: pid \d+ on .+, last heartbeat \d+ s ago", text)
