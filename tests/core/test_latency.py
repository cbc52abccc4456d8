"""Aligned widths (`prune.round_to`) and the measured latency model (`kesi latency profile`, `kesi plan --latency`).

What is pinned here is the arithmetic and the plumbing: the rounding on hand-computed chains, the
prediction on a crafted table, the table's keys and refusals, and a real (tiny, fast) profile through
onnxruntime. How well predictions match measured latency is a benchmark's question
(bench/pruned_latency.py --latency TABLE), not a unit test's.
"""

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch

from kesi_dist.cli import main
from kesi_dist.config import load_config
from kesi_dist.errors import BadValue, UsageError
from kesi_dist.latency import grid_for, profile
from kesi_dist.latency_table import check_table, load_table, plan_latency, predict
from kesi_dist.models import build_model
from kesi_dist.plan import plan_schedule
from kesi_dist.pruning import align, aligned_count, kept_count, pfec_prune

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs/kesi/quickstart.yaml"


def _kesi(*args: str) -> subprocess.CompletedProcess:
    """`kesi ARGS` in this process (the CLI's main, as the console script calls it): its exit code, stdout
    and stderr. A fresh `kesi` process costs seconds of imports; the real-process path of these refusals is
    tests/e2e/test_bad_input.py::test_bad_input_real_command (slow)."""
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        torch.set_num_threads(threads)  # `latency profile --threads` sets this process's
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_align_rounds_to_the_nearest_multiple_never_to_zero_never_above_the_limit():
    assert align(14.4, 8) == 16 and align(11, 8) == 8 and align(12, 8) == 16  # halves go up
    assert align(3, 8) == 8 and align(0, 8) == 8  # never zero
    assert align(20, 8, limit=16) == 16 and align(20, 8, limit=19) == 16
    assert align(5, 8, limit=6) == 6  # a unit already narrower than one multiple keeps its width
    assert align(9, 1) == 9
    with pytest.raises(BadValue, match="round_to"):
        align(9, 0)


def test_aligned_chain_rounds_the_papers_width_so_it_never_stalls():
    # Paper chain of a 64-channel unit at ratio 0.3: 64 -> 44 -> 30 -> 21 -> 14 -> 9.
    paper = [64]
    for _ in range(5):
        paper.append(kept_count(paper[-1], 0.3))
    assert paper == [64, 44, 30, 21, 14, 9]
    current, aligned = 64, []
    for it in range(1, 6):
        current = aligned_count(64, current, 0.3, it, 8)
        aligned.append(current)
    assert aligned == [48, 32, 24, 16, 8]
    # 16 at ratio 0.1: 14, 12, 10, 9, 8 -> rounding each step's own width would stay at 16 forever.
    current, aligned = 16, []
    for it in range(1, 6):
        current = aligned_count(16, current, 0.1, it, 8)
        aligned.append(current)
    assert aligned == [16, 16, 8, 8, 8]
    assert aligned_count(64, 44, 0.3, 2, 1) == kept_count(44, 0.3)  # round_to 1 is the paper's chain


def test_pfec_with_round_to_keeps_multiples_and_the_paper_schedule_is_unchanged():
    model = build_model("resnet20", 10)
    paper = pfec_prune(model, [0.1, 0.2, 0.3])
    assert paper.widths == [14] * 3 + [25] * 3 + [44] * 3
    aligned = pfec_prune(model, [0.1, 0.2, 0.3], round_to=8, iteration=1)
    assert aligned.widths == [16] * 3 + [24] * 3 + [48] * 3
    second = pfec_prune(aligned, [0.1, 0.2, 0.3], round_to=8, iteration=2)
    assert second.widths == [16] * 3 + [24] * 3 + [32] * 3  # paper: 12, 20, 30 (halves round up)


def test_plan_shows_aligned_widths_and_mwp_refuses_round_to(tmp_path):
    cfg = load_config(QUICKSTART, ["method.prune.round_to=8"])
    rows = plan_schedule(cfg)["iterations"]
    assert all(w % 8 == 0 for r in rows[1:] for w in r["widths"])
    assert rows[-1]["macs"] < rows[0]["macs"]
    r = _kesi("plan", str(QUICKSTART), "method.prune.method=mwp", "method.prune.round_to=8")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "round_to" in r.stderr


def test_prediction_is_the_full_time_plus_each_units_interpolated_difference():
    table = {"full_ms": 20.0, "full_widths": [4, 4], "key": {"arch": "toy"},
             "units": [{"name": "a", "piece": "p"}, {"name": "b", "piece": "p"}],
             "pieces": {"p": {"widths": [1, 2, 4], "ms": [1.0, 2.0, 6.0]}}}
    assert predict(table, [4, 4]) == 20.0
    assert predict(table, [2, 3]) == pytest.approx(20 + (2 - 6) + (4 - 6))  # 3 is halfway from 2 to 4
    with pytest.raises(UsageError, match="2 units"):
        predict(table, [4])
    assert grid_for(16) == list(range(1, 17))
    assert grid_for(128, step=8) == list(range(1, 65)) + list(range(72, 129, 8))


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    """A real profile of the quickstart's ResNet-20 through the CLI (batch 2, one timed run per width)."""
    out = tmp_path_factory.mktemp("latency") / "table.json"
    r = _kesi("latency", "profile", str(QUICKSTART), "--batch", "2", "--threads", "1", "--repeats", "1",
              "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "5 distinct unit pieces" in r.stdout
    return out


def test_profile_table_is_keyed_and_predicts_its_own_network_exactly(table_file):
    table = load_table(table_file)
    key = table["key"]
    assert key["arch"] == "resnet20" and key["batch"] == 2 and key["threads"] == 1 and key["runtime"] == "onnxruntime"
    assert key["resolution"] == load_config(QUICKSTART).data.resolution and key["cpu"] and key["runtime_version"]
    # resnet20: 9 units, 5 distinct pieces (first block of each stage, and the rest of stage s)
    assert len(table["units"]) == 9 and len(table["pieces"]) == 5
    for u, c in zip(table["units"], table["full_widths"]):
        p = table["pieces"][u["piece"]]
        assert p["widths"] == list(range(1, c + 1)) and len(p["ms"]) == c and all(m > 0 for m in p["ms"])
    assert predict(table, table["full_widths"]) == pytest.approx(table["full_ms"])
    # Any other widths: the whole network's time plus each unit's measured difference to its full width.
    narrowest = table["full_ms"] + sum(table["pieces"][u["piece"]]["ms"][0] - table["pieces"][u["piece"]]["ms"][c - 1]
                                       for u, c in zip(table["units"], table["full_widths"]))
    assert predict(table, [1] * 9) == pytest.approx(narrowest)


@pytest.mark.slow  # seconds: kept out of the fast part
def test_plan_with_a_latency_table_adds_predicted_ms_per_iteration(table_file):
    r = _kesi("plan", str(QUICKSTART), "--json", "--latency", str(table_file))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    table = load_table(table_file)
    assert plan["latency"]["batch"] == 2
    for row in plan["iterations"]:
        assert row["latency_ms"] == pytest.approx(predict(table, row["widths"]), abs=1e-3)
    assert plan["iterations"][0]["latency_ms"] == pytest.approx(table["full_ms"], abs=1e-3)
    r = _kesi("plan", str(QUICKSTART), "--latency", str(table_file))
    text = " ".join(r.stdout.split())  # the caption wraps
    assert r.returncode == 0 and "ms ↓" in text and "predicted onnxruntime latency at batch 2, 1 thread on" in text


def test_a_table_for_another_network_or_machine_is_named(table_file, tmp_path):
    r = _kesi("plan", str(ROOT / "configs/kesi/cifar10_resnet56_pfec.yaml"), "--latency", str(table_file))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(table_file) in r.stderr and "arch='resnet20'" in r.stderr and "kesi latency profile" in r.stderr
    table = load_table(table_file)
    table["key"]["cpu"] = "Some Other CPU"
    cfg = load_config(QUICKSTART)
    warnings = check_table(table, "t.json", "resnet20", 10, cfg.data.resolution, cfg.model.options())
    assert len(warnings) == 1 and "Some Other CPU" in warnings[0]
    assert plan_latency(plan_schedule(cfg), table)["iterations"][0]["latency_ms"] == pytest.approx(table["full_ms"], abs=1e-3)
    for text, match in (("{", "not a readable latency table"), ('{"a": 1}', "not a kesi latency table")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_table(bad)
    with pytest.raises(UsageError, match="no such latency table"):
        load_table(tmp_path / "missing.json")


def test_units_that_feed_each_other_are_refused():
    with pytest.raises(UsageError, match="not additive"):
        profile("vgg16", 10, 32, batch=1, threads=1)


def _linear_table(cfg, path: Path) -> dict:
    """A table for `cfg`'s network where every piece costs its width in ms (no timing involved)."""
    from kesi_dist.latency_table import SCHEMA, table_key
    from kesi_dist.models import default_widths, model_units
    from kesi_dist.model_config import default_num_classes

    arch, full = cfg.model.arch, default_widths(cfg.model.arch)
    table = {"schema": SCHEMA, "full_widths": full, "full_ms": float(sum(full)),
             "key": table_key(arch, default_num_classes(cfg), cfg.data.resolution, cfg.model.options(), 64, 2),
             "units": [{"name": u.name, "piece": u.name} for u in model_units(arch)],
             "pieces": {u.name: {"widths": list(range(1, c + 1)), "ms": [float(w) for w in range(1, c + 1)]}
                        for u, c in zip(model_units(arch), full)}}
    path.write_text(json.dumps(table))
    return table


@pytest.mark.parametrize("round_to", [1, 8])
def test_a_latency_budget_scales_the_schedule_by_the_least_factor_that_meets_it(tmp_path, round_to):
    from kesi_dist.methods.kesi.prune import chain_widths, resolve_prune

    table = _linear_table(load_config(QUICKSTART), tmp_path / "t.json")
    cfg = load_config(QUICKSTART, [f"method.prune.target.table={tmp_path / 't.json'}",
                                   "method.prune.target.latency_ratio=0.5", f"method.prune.round_to={round_to}"])
    prune, budget = resolve_prune(cfg)
    assert budget["predicted_ms"] <= 0.5 * table["full_ms"] and budget["predicted_ms"] == predict(table, budget["widths"])
    assert prune.target is None and budget["scale"] > 0
    assert [r / budget["scale"] for r in prune.stage_ratios] == pytest.approx(cfg.method.prune.stage_ratios, rel=1e-9)
    assert chain_widths(cfg.model.arch, prune)[-1] == budget["widths"]
    if round_to > 1:
        assert all(w % round_to == 0 for w in budget["widths"])
    # the least factor: the previous one on the grid (400 steps up to a ratio of 0.95) misses the budget
    previous = budget["scale"] - 0.95 / max(cfg.method.prune.stage_ratios) / 400
    assert previous > 0 and predict(table, chain_widths(cfg.model.arch, cfg.method.prune, previous)[-1]) > 0.5 * table["full_ms"]
    # plan applies it: the last iteration has the budget's widths and its predicted ms
    plan = plan_schedule(cfg)
    assert plan["iterations"][-1]["widths"] == budget["widths"] and "latency budget 0.50" in plan["note"]
    assert plan["iterations"][-1]["latency_ms"] == pytest.approx(budget["predicted_ms"], abs=1e-3)


def test_an_unreachable_or_mismatched_budget_is_one_line_naming_the_key(tmp_path):
    _linear_table(load_config(QUICKSTART), tmp_path / "t.json")
    r = _kesi("plan", str(QUICKSTART), f"method.prune.target.table={tmp_path / 't.json'}",
              "method.prune.target.latency_ratio=0.01")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "method.prune.target.latency_ratio=0.01: unreachable" in r.stderr
    r = _kesi("plan", str(ROOT / "configs/kesi/cifar10_resnet56_pfec.yaml"), f"method.prune.target.table={tmp_path / 't.json'}",
              "method.prune.target.latency_ratio=0.5")
    assert r.returncode == 2 and "method.prune.target.table" in r.stderr and "arch='resnet20'" in r.stderr
    r = _kesi("plan", str(QUICKSTART), "method.prune.method=mwp", f"method.prune.target.table={tmp_path / 't.json'}",
              "method.prune.target.latency_ratio=0.5")
    assert r.returncode == 2 and "needs pfec" in r.stderr


def test_report_and_model_card_show_predicted_and_measured_latency():
    from kesi_dist.methods.kesi.report import layout
    from kesi_dist.report import render_markdown

    report = {"status": "complete", "baseline": None, "timings": {}, "protocol": {},
              "latency": {"batch": 64, "threads": 2, "table": "r.json", "table_cpu": "CPU A", "cpu": "CPU A",
                          "rows": {"baseline": {"predicted_ms": 10.0, "measured_ms": 10.5},
                                   "student": {"predicted_ms": 5.0, "measured_ms": 5.25}}}}
    md = render_markdown(report, layout(load_config(QUICKSTART)))
    assert "## Latency (onnxruntime)" in md and "| student | 5.00 | 5.25 | 2.00x |" in md
    assert "Batch 64, 2 threads; predicted by `r.json`" in md


def test_ekg_search_with_a_latency_cost_stops_on_the_cost_not_the_macs():
    from kesi_dist.methods.ekg.search import SubnetSearch
    from kesi_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4).eval()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))  # one holdout batch: only which cost stops it matters
    # a cost that only counts stage 3's widths: the search must narrow stage 3 to meet it
    cost = lambda w: float(sum(w[6:]))  # noqa: E731
    search = SubnetSearch(model, x, y, target_ratio=0.5, batch_size=16, cost=cost)
    steps = search.run()
    assert steps[-1].budget_ratio <= 0.5 < steps[-2].budget_ratio
    assert steps[-1].budget_ratio == pytest.approx(cost(steps[-1].widths) / (3 * 64))
    assert steps[-1].macs_ratio == pytest.approx(search.macs(steps[-1].widths) / search.base_macs)


@pytest.mark.parametrize("method,key", [("ekg", "search.round_to"), ("swp", "supernet.round_to")])
def test_ekg_and_swp_plans_put_the_uniform_arm_under_a_latency_budget(tmp_path, method, key):
    from kesi_dist.latency_table import load_table

    config = ROOT / f"configs/{method}/quickstart.yaml"
    table = _linear_table(load_config(config), tmp_path / "t.json")
    cfg = load_config(config, [f"method.target_latency.table={tmp_path / 't.json'}",
                               "method.target_latency.latency_ratio=0.5", f"method.{key}=4"])
    plan = plan_schedule(cfg)
    uniform = plan["iterations"][1]
    assert uniform["latency_ms"] <= 0.5 * table["full_ms"] and all(w % 4 == 0 for w in uniform["widths"])
    assert uniform["latency_ms"] == pytest.approx(predict(load_table(tmp_path / "t.json"), uniform["widths"]), abs=1e-3)
    assert "50% of the baseline's predicted" in plan["note"]
