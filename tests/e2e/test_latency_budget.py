"""A KESI run pruned against a measured-latency budget: the plan's widths are what it trains, and its
report and model card give the student's predicted and measured onnxruntime latency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kesi_dist.config import load_config
from kesi_dist.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kesi_run_with_a_latency_budget_reports_predicted_and_measured_latency(ray_local, tiny_data, tmp_path):
    from kesi_dist.latency import predict, profile
    from kesi_dist.launch import run_method
    from kesi_dist.methods.kesi.prune import resolve_prune
    from kesi_dist.plan import default_num_classes

    m = METHODS["kesi"]
    sets = [*m.test_overrides, "data.source=prepared", f"data.prepared={tiny_data}", "data.resolution=16"]
    cfg = load_config(ROOT / m.smoke_config, sets)
    table = profile(cfg.model.arch, default_num_classes(cfg), 16, batch=4, threads=1, repeats=1, warmup=1)
    (tmp_path / "table.json").write_text(json.dumps(table))
    cfg = load_config(ROOT / m.smoke_config, [*sets, f"method.prune.target.table={tmp_path / 'table.json'}",
                                               "method.prune.target.latency_ratio=0.8", "method.prune.round_to=4"])
    _, budget = resolve_prune(cfg)
    out = tmp_path / "run"
    run_method(cfg, str(out), max_steps=2)

    report = json.loads((out / "report.json").read_text())
    student = next(s for s in report["snapshots"] if s["name"] == "student")
    assert student["widths"] == budget["widths"] and all(w % 4 == 0 for w in budget["widths"])
    lat = report["latency"]
    assert lat["batch"] == 4 and lat["threads"] == 1 and set(lat["rows"]) == {"baseline", "student"}
    assert lat["rows"]["student"]["predicted_ms"] == pytest.approx(predict(table, budget["widths"]), abs=1e-3)
    assert lat["rows"]["baseline"]["predicted_ms"] == pytest.approx(table["full_ms"], abs=1e-3)
    assert all(r["measured_ms"] > 0 for r in lat["rows"].values())
    assert "## Latency (onnxruntime)" in (out / "report.md").read_text()
    assert "### Latency (onnxruntime)" in (out / "MODEL_CARD.md").read_text()
