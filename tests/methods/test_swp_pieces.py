"""SWP's pure pieces: the evolutionary search never leaves the MACs band and resumes exactly; Kendall tau
and Spearman rho against scipy; the stage split of the search space."""

from __future__ import annotations

import math
import random

import pytest

from kesi_dist.methods.swp.correlation import kendall_tau, mean_gap, spearman_rho
from kesi_dist.methods.swp.evolution import Evolution, sample_in_band


def _toy(seed=0):
    """A 6-unit space whose 'MACs' are the sum of widths and whose fitness prefers wide early units."""
    choices = [[2, 4, 6, 8]] * 6
    macs = lambda w: sum(w)  # noqa: E731
    calls = []

    def fitness_many(cands):
        calls.append(len(cands))
        return [sum(w * (6 - i) for i, w in enumerate(c)) + random.Random(str(c)).random() for c in cands]

    return choices, macs, fitness_many, calls


def test_evolution_never_leaves_the_band_and_improves():
    choices, macs, fitness_many, calls = _toy()
    evo = Evolution(choices, macs, 24, 28, fitness_many, population=12, seed=1)
    first = evo.start()
    for _ in range(6):
        evo.step()
    assert all(24 <= macs(list(c)) <= 28 for c in evo.fitness)  # every candidate ever evaluated, not only the best
    best, fit = evo.best()
    assert 24 <= macs(list(best)) <= 28 and fit == evo.history[-1]["best"] > first["best"]  # strictly better
    assert [h["best"] for h in evo.history] == sorted(h["best"] for h in evo.history)  # parents are kept
    assert sum(calls) == len(evo.fitness)  # a candidate is never evaluated twice


def test_evolution_resumed_from_a_saved_generation_goes_on_as_the_uninterrupted_one():
    import json

    choices, macs, fitness_many, _ = _toy()
    whole = Evolution(choices, macs, 20, 30, fitness_many, population=10, seed=4)
    whole.start()
    for _ in range(5):
        whole.step()
    first = Evolution(choices, macs, 20, 30, fitness_many, population=10, seed=4)
    first.start()
    first.step(), first.step()
    resumed = Evolution(choices, macs, 20, 30, fitness_many, population=10, seed=4)
    resumed.load_state(json.loads(json.dumps(first.state())))  # through JSON, as the stage saves it
    for _ in range(3):
        resumed.step()
    assert resumed.best() == whole.best() and resumed.history == whole.history


def test_sampling_outside_any_reachable_band_is_an_error():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="no candidate in the MACs band"):
        sample_in_band(rng, lambda: [rng.choice([1, 2])], lambda w: sum(w), 10, 12, tries=50)


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_and_spearman_rho_match_scipy(seed):
    from scipy import stats

    rng = random.Random(seed)
    x = [rng.choice([90.0, 91.5, 92.0, 93.25, 94.0]) for _ in range(12)]  # ties, as accuracies on few images have
    y = [v + rng.gauss(0, 1) if seed % 2 else rng.choice([95.0, 96.0, 97.0]) for v in x]
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert mean_gap([1.0, 2.0], [2.0, 0.0]) == 1.5
    assert math.isnan(kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant proxy ranks nothing


def test_the_stage_split_shrinks_each_supernets_search_space():
    from pathlib import Path

    from kesi_dist.config import load_config
    from kesi_dist.plan import plan_schedule

    plan = plan_schedule(load_config(Path(__file__).resolve().parents[2] / "configs" / "swp" / "quickstart.yaml"))
    assert plan["search_space"] == {"per_stage": [7 ** 3] * 3, "whole_net": 7 ** 9}  # resnet20: 3 units a stage
    base, uniform = plan["iterations"]
    assert uniform["macs"] <= 0.45 * base["macs"] and plan["target_macs"] == int(0.45 * base["macs"])


def test_the_report_scores_each_supernets_proxies_against_the_retrained_accuracies():
    from kesi_dist.methods.swp.report import build_report, sections
    from kesi_dist.methods.swp.correlation import summary

    def snap(name, acc):
        return {"name": name, "val_acc": acc, "holdout_acc": acc - 0.01, "params": 10, "nonzero_params": 10,
                "macs": 100}

    proxies = [(0.90, 0.80), (0.92, 0.95), (0.94, 0.85)]
    retrained = [0.91, 0.93, 0.96]
    manifest = {"status": "complete", "snapshots": {
        "baseline": snap("baseline", 0.97), "student": snap("student", 0.95), "uniform": snap("uniform", 0.94),
        **{f"subnet{i}": snap(f"subnet{i}", a) for i, a in enumerate(retrained)}},
        "stages": {"data": {"val_size": 360}, "supernets": {"runs": [], "overlap": 3.0},
                   "search": {"subnets": [{"widths": [1], "macs": 44, "proxy_swp": a, "proxy_whole_net": b}
                                          for a, b in proxies], "generations": [], "proxy": 0.95}}}
    report = build_report(manifest)
    c = report["correlation"]
    assert [s["retrained"] for s in c["subnets"]] == [91.0, 93.0, 96.0]  # percent
    assert c["swp"] == summary([90.0, 92.0, 94.0], [91.0, 93.0, 96.0]) and c["swp"]["kendall_tau"] == 1.0
    assert c["whole_net"]["kendall_tau"] == pytest.approx(1 / 3)  # one discordant pair of three
    assert c["swp"]["mean_gap"] == pytest.approx(4 / 3)
    md = "\n".join(sections(report))
    assert "| SWP (stage-wise, sandwich, in-place KD) | 1.000 | 1.000 | 1.33 |" in md
    assert "-1.00 points" not in md and "+1.00 points" in md  # searched 95 vs uniform 94
