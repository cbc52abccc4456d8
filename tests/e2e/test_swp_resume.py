"""SWP's driver killed (SIGKILL to its process group) twice and `--resume`d: during the stage supernets'
training, then during the search. Supernets that finished before the kill are not trained again; the
search continues after its last saved generation and ends with the result of an uninterrupted search
of the same supernet (the same generations, the same best sub-net and proxy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kesi_dist.config import load_config, loader_spec
from kesi_dist.methods.swp.evolution import Evolution
from kesi_dist.checkpoint import load_model as _load
from kesi_dist.methods.swp.search_stage import ProxyWorker
from kesi_dist.models.slimmable import width_choices
from kesi_dist.pruning import macs_function
from tests.killing import _manifest, run_until

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "swp" / "smoke.yaml")
SETS = ("baseline.epochs=2", "retrain.epochs=1", "search.generations=5", "correlation.subnets=0")

pytestmark = pytest.mark.slow


@pytest.mark.timeout(2000)
def test_killed_during_supernets_and_search_resumes_without_redoing_finished_work(tmp_path):
    run = tmp_path / "run"

    def some_supernets(r: Path, m: dict) -> bool:
        done = [n for n in m["snapshots"] if n.startswith("supernet_")]
        return m["stages"].get("supernets", {}).get("status") == "running" and 1 <= len(done) < 3

    m1, _ = run_until(run, some_supernets, "supernets", resume=False, config=SMOKE, sets=SETS)
    finished = {n: e for n, e in m1["snapshots"].items() if n.startswith("supernet_")}
    files = {n: (run / "snapshots" / f"{n}.pt").stat().st_mtime_ns for n in finished}

    def in_search(r: Path, m: dict) -> bool:
        return len(m["stages"].get("search", {}).get("generations") or []) >= 2  # generation 1 saved

    m2, _ = run_until(run, in_search, "search", resume=True, config=SMOKE, sets=SETS)
    log2 = (run.parent / "run-search.log").read_text()
    for name, entry in finished.items():  # reused, not trained again
        assert m2["snapshots"][name]["end"] == entry["end"], name
        assert (run / "snapshots" / f"{name}.pt").stat().st_mtime_ns == files[name], name
        assert f"{name} done" not in log2
    assert all(f"supernet_{s}" in m2["snapshots"] for s in ("s0", "s1", "s2"))
    saved = len(m2["stages"]["search"]["generations"]) - 1  # the last generation noted before the kill

    log = tmp_path / "resume.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "kesi_dist.cli", "run", SMOKE, "--output", str(run), *SETS,
                               "--resume"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=1500)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    # The state file is written before the manifest notes a generation: the kill may fall in between.
    resumed = next(int(line.split("after generation ")[1].split()[0]) for line in text.splitlines()
                   if "resuming after generation" in line)
    assert resumed in (saved, saved + 1) and resumed >= 1
    assert "generation 0:" not in text and f"generation {resumed + 1}:" in text
    m = _manifest(run)
    gens = m["stages"]["search"]["generations"]
    assert [g["generation"] for g in gens] == list(range(6))  # 0..5, each once
    assert gens[:saved + 1] == m2["stages"]["search"]["generations"]
    assert m["stages"]["supernets"]["end"] == m2["stages"]["supernets"]["end"]
    nets = m["stages"]["supernets"]
    # Every supernet was a Ray Train run (a worker group), and stage supernets trained at the same time.
    assert all(m["snapshots"][r["name"]]["workers"] >= 1 and r["end"] > r["start"] for r in nets["runs"])
    assert nets["overlap"] > 0
    assert m["status"] == "complete" and {"student", "uniform"} <= set(m["snapshots"])

    # An uninterrupted search of the same assembled supernet on the same holdout and calibration batches,
    # in one process (the actor class run in place), takes the same generations to the same sub-net.
    cfg = load_config(run / "config.yaml")
    search = m["stages"]["search"]
    supernet = str(run / "swp" / "supernet.pt")
    worker = ProxyWorker([supernet], vars(loader_spec(cfg, str(run / "data"))), calib_batches=cfg.method.search.calib_batches,
                         threads=1, gpus=0, seed=cfg.seed)
    net = _load(supernet)
    macs = macs_function(net, (3, cfg.data.resolution, cfg.data.resolution))
    target, band = cfg.method.budget().ratio, cfg.method.search.band
    s = cfg.method.search
    evo = Evolution(width_choices(net.widths, cfg.method.supernet.ratios, cfg.method.supernet.round_to), macs,
                    (target - band) * macs(net.widths), target * macs(net.widths),
                    lambda cands: [worker.evaluate(list(c)) for c in cands], population=s.population,
                    parents=s.parents, mutation=s.mutation, mutate_prob=s.mutate_prob, seed=cfg.seed)
    evo.start()
    while evo.generation < s.generations:
        evo.step()
    assert evo.history == gens
    widths, proxy = evo.best()
    assert list(widths) == search["widths"] and proxy == search["proxy"]
