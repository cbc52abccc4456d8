"""KESI on a torchvision network (issue 26, parts 4-5): PFEC through the config's schedule with stream units
kept whole unless `prune.stream: true`, aligned widths, MWP's global sparsity, EKG's MACs budget, and the
latency table's one-line refusal of a graph network before anything is measured."""


import pytest

from kesi_dist.cli import main
from kesi_dist.config import parse_config
from kesi_dist.errors import UsageError
from kesi_dist.models import default_widths, model_units
from kesi_dist.plan import plan_schedule

ARCH = "torchvision:resnet18"
DATA = {"source": "digits", "resolution": 16}


def _kesi(**prune):
    return parse_config({"model": {"arch": ARCH}, "data": DATA, "method": {"name": "kesi", "prune": prune}})


def test_pfec_keeps_stream_units_unless_prune_stream():
    units, full = model_units(ARCH), default_widths(ARCH)
    stream = [i for i, u in enumerate(units) if u.kind == "stream"]
    assert stream and len(stream) < len(units)
    kept = plan_schedule(_kesi(iterations=1, stage_ratios=[0.5] * 4))
    cut = plan_schedule(_kesi(iterations=1, stage_ratios=[0.5] * 4, stream=True))
    w_kept, w_cut = kept["iterations"][1]["widths"], cut["iterations"][1]["widths"]
    for i, (u, c) in enumerate(zip(units, full)):
        assert w_kept[i] == (c if i in stream else c // 2), u.name
        assert w_cut[i] == c // 2, u.name
    assert kept["units"]["kept"] == ["stream"] and cut["units"]["kept"] == []
    assert kept["units"]["kinds"] == {"stream": len(stream), "inner": len(units) - len(stream)}
    assert cut["iterations"][1]["macs"] < kept["iterations"][1]["macs"] < kept["iterations"][0]["macs"]


def test_pfec_aligned_widths_compound_over_iterations():
    plan = plan_schedule(_kesi(iterations=3, stage_ratios=[0.3] * 4, round_to=8))
    rows = plan["iterations"]
    assert all(w % 8 == 0 for r in rows for w in r["widths"])
    assert [r["macs"] for r in rows] == sorted((r["macs"] for r in rows), reverse=True)
    assert rows[3]["macs"] < 0.5 * rows[0]["macs"]


def test_mwp_prunes_the_graph_net_to_its_targets():
    plan = plan_schedule(_kesi(method="mwp", iterations=2, targets=[0.3, 0.5]))
    rows = plan["iterations"]
    assert rows[0]["params"] == rows[2]["params"] and rows[0]["widths"] == rows[2]["widths"]
    removed = [(rows[0]["nonzero_params"] - r["nonzero_params"]) / rows[0]["params"] for r in rows[1:]]
    assert 0.25 < removed[0] < 0.3 < removed[1] < 0.5  # conv weights are most, not all, of the params


def test_prune_stream_is_pfec_only():
    with pytest.raises(UsageError, match="prune.stream"):
        _kesi(method="mwp", stream=True)


def test_ekg_macs_budget_on_a_graph_net():
    cfg = parse_config({"model": {"arch": ARCH}, "data": DATA, "method": {"name": "ekg", "target_macs_ratio": 0.5}})
    rows = plan_schedule(cfg)["iterations"]
    assert 0.45 * rows[0]["macs"] < rows[1]["macs"] <= 0.5 * rows[0]["macs"]


@pytest.mark.slow  # seconds: kept out of the fast part
def test_latency_tables_refuse_a_graph_net_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "tv.yaml"
    cfg.write_text(f"model: {{arch: '{ARCH}'}}\ndata: {{source: digits, resolution: 16}}\n"
                   "method: {prune: {stage_ratios: [0.1, 0.1, 0.2, 0.3]}}\n")
    table = tmp_path / "t.json"
    for args in (["latency", "profile", str(cfg), "--output", str(table)], ["plan", str(cfg), "--latency", str(table)]):
        code = main(args)  # the CLI in-process; test_bad_input_real_command runs real `kesi` processes
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1, err
        assert "latency tables cover the zoo's networks only" in lines[0] and ARCH in lines[0]
        assert not table.exists()


def test_a_latency_budget_on_a_graph_net_is_refused_naming_its_key(tmp_path):
    from kesi_dist.methods.kesi.prune import resolve_prune

    cfg = _kesi(stage_ratios=[0.1] * 4, target={"table": str(tmp_path / "t.json"), "latency_ratio": 0.5})
    with pytest.raises(UsageError, match=r"^method.prune.target: torchvision:resnet18: latency tables cover"):
        resolve_prune(cfg)
