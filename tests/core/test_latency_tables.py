"""Latency tables are untrusted input (`kesi_dist.latency_table`): every reader refuses a broken table in
one line naming the file and the field (`kesi plan --latency`, each method's budget, the latency stage),
`kesi latency profile` re-measures load spikes, and a table whose cost falls steeply as a width grows, or
that was measured on another machine, is warned about alike under `--latency` and under a budget. The
same refusals through the real CLI, `kesi run` included, are rows of tests/e2e/test_bad_input.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from kesi_dist.cli import main
from kesi_dist.config import load_config
from kesi_dist.errors import UsageError
from kesi_dist.budget import run_budget
from kesi_dist.latency_table import load_table
from kesi_dist.latency_table import despike, falls_steeply, spikes
from tests.core.test_latency import _linear_table

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs/kesi/quickstart.yaml"


def _piece(table: dict) -> str:
    return table["units"][0]["piece"]


def _break(table: dict, how: str) -> str:
    """Break `table` in place one way; returns the field the refusal must name."""
    p = _piece(table)
    if how == "nan":
        table["pieces"][p]["ms"][3] = math.nan
    elif how == "inf":
        table["full_ms"] = math.inf
    elif how == "negative":
        table["pieces"][p]["ms"][0] = -0.5
    elif how == "text":
        table["pieces"][p]["ms"][2] = "fast"
    elif how == "missing":
        del table["full_ms"]
    elif how == "mistyped_units":
        table["units"] = {"layer1.0": p}
    elif how == "bool_threads":
        table["key"]["threads"] = True
    elif how == "not_increasing":
        table["pieces"][p]["widths"][5] = 2
    elif how == "unknown_piece":
        table["units"][1]["piece"] = "nowhere"
    elif how == "short_ms":
        table["pieces"][p]["ms"].pop()
    return {"nan": f"pieces['{p}'].ms[3]", "inf": "full_ms", "negative": f"pieces['{p}'].ms[0]",
            "text": f"pieces['{p}'].ms[2]", "missing": "full_ms", "mistyped_units": "units",
            "bool_threads": "key.threads", "not_increasing": f"pieces['{p}'].widths[5]",
            "unknown_piece": "units[1].piece", "short_ms": f"pieces['{p}'].ms"}[how]


BROKEN = ["nan", "inf", "negative", "text", "missing", "mistyped_units", "bool_threads", "not_increasing",
          "unknown_piece", "short_ms"]


@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_table_is_refused_naming_the_file_and_field(tmp_path, how):
    path = tmp_path / "t.json"
    table = _linear_table(load_config(QUICKSTART), path)
    field = _break(table, how)
    path.write_text(json.dumps(table))  # json writes NaN and Infinity as Python reads them back
    with pytest.raises(UsageError) as e:
        load_table(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}: latency table field {field}:"), text
    assert "kesi latency profile" in text


@pytest.mark.parametrize("method", ["kesi", "ekg", "swp"])
def test_every_methods_budget_refuses_it_naming_its_key(tmp_path, method):
    from kesi_dist.methods import METHODS

    config = ROOT / f"configs/{method}/quickstart.yaml"
    path = tmp_path / "t.json"
    table = _linear_table(load_config(config), path)
    field = _break(table, "nan")
    path.write_text(json.dumps(table))
    key = METHODS[method].latency_target
    cfg = load_config(config, [f"{key}.table={path}", f"{key}.latency_ratio=0.5"])
    with pytest.raises(UsageError, match="^" + re.escape(f"{key}.table: {path}: latency table field {field}:")):
        run_budget(cfg)
    assert main(["plan", str(config), f"{key}.table={path}", f"{key}.latency_ratio=0.5"]) == 2  # kesi plan too


def test_the_latency_stage_refuses_it(tmp_path):
    from kesi_dist.runs import RunContext, open_run
    from kesi_dist.stages.latency import latency_stage

    path = tmp_path / "t.json"
    table = _linear_table(load_config(QUICKSTART), path)
    field = _break(table, "negative")
    path.write_text(json.dumps(table))
    run, manifest = open_run(str(tmp_path / "run"), {"a": 1}, resume=False)
    ctx = RunContext(run, manifest, resolution=32)
    with pytest.raises(UsageError, match=re.escape(f"{path}: latency table field {field}:")):
        latency_stage(ctx, table_path=str(path), snapshots=["baseline"], resolution=32)
    assert manifest.stages["latency"]["status"] == "failed"


def test_spikes_are_remeasured_and_a_lasting_one_is_set_to_its_neighbour():
    widths = [1, 2, 3, 4, 5, 6]
    ms = [1.0, 1.1, 22.0, 1.3, 1.4, 1.5]  # one width at 20x its neighbours: a load spike
    assert spikes(widths, ms) == [2]
    calls = []

    def retime(idx):  # the spike is gone when timed again
        calls.append(list(idx))
        return [{1: 1.12, 2: 1.2, 3: 1.31}[i] for i in idx]

    done = despike("p", widths, ms, retime)
    assert calls == [[1, 2, 3]] and ms == [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    assert done == [{"piece": "p", "width": 3, "ms_before": 22.0, "ms": 1.2, "how": "re-measured"}]
    ms = [1.0, 1.1, 22.0, 1.3]
    done = despike("p", widths[:4], ms, lambda idx: [30.0] * len(idx))  # still a spike after every round
    assert ms == [1.0, 1.1, 1.3, 1.3] and done[0]["how"] == "set to its neighbour"


def test_a_cost_that_falls_steeply_and_another_machine_are_warned_alike_under_latency_and_a_budget(tmp_path, capsys):
    path = tmp_path / "t.json"
    table = _linear_table(load_config(QUICKSTART), path)
    p = _piece(table)
    table["pieces"][p]["ms"][4] = 50.0  # width 5 costs more than the whole unit at width 16
    table["key"]["cpu"] = "Another CPU"
    table["key"]["threads"] = 4096
    path.write_text(json.dumps(table))
    warnings = falls_steeply(load_table(path), path)
    assert len(warnings) == 1 and "unit layer1.0" in warnings[0]
    assert "50 ms at width 5 but 6 ms at width 6" in warnings[0] and "falls 8.3x" in warnings[0]
    capsys.readouterr()
    assert main(["plan", str(QUICKSTART), "--latency", str(path)]) == 0
    under_latency = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert main(["plan", str(QUICKSTART), f"method.prune.target.table={path}",
                 "method.prune.target.latency_ratio=0.9"]) == 0
    under_budget = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(under_latency) == 3 and any("Another CPU" in w for w in under_latency)
    assert any("4096 threads" in w for w in under_latency) and any("falls 8.3x" in w for w in under_latency)
    assert under_budget == [w.replace("warning: ", "warning: method.prune.target.table: ", 1) for w in under_latency]
