"""The soft-label pass on a cluster that shrinks below its pool (cluster/local-cluster.sh: a 0-CPU head and
three 1-CPU workers): one worker node is killed before the pass, another during it, leaving one node
for a pool of two actors. The pass finishes with the actor it has (the lost one's unit goes back to
the queue), distillation runs on the surviving node, and the run completes.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_cluster_run import SMOKE, _nodes, _Run
from tests.localcluster import RAY, client_env, kill_node, local_cluster, sh

pytestmark = pytest.mark.slow


def _kill_a_pool_node(cluster: dict) -> str:
    """SIGKILL one worker node that runs an actor of the soft-label pool; returns its node id."""
    r = sh(RAY, "list", "actors", "--format", "json", "--detail", "--filter", "state=ALIVE", "--limit", "1000",
           env=cluster["env"])
    actors = json.loads(r.stdout) if r.stdout.lstrip().startswith("[") else []
    hosts = sorted({a["node_id"] for a in actors if a["class_name"] == "_Host"}
                   - {n for n, name in cluster["nodes"].items() if name == "head"})
    assert hosts, actors
    assert kill_node(cluster["state"], cluster["nodes"][hosts[0]]), hosts[0]
    return hosts[0]


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(workers=3) as c:
        c["env"] = client_env(**c["auth"], RAY_ADDRESS=c["state"]["dashboard_url"])
        c["nodes"] = _nodes(c["env"])
        yield c


@pytest.mark.timeout(1500)
def test_soft_label_pass_survives_losing_nodes_below_its_pool(cluster, tmp_path):
    out = tmp_path / "run"
    run = _Run(cluster, SMOKE, "--output", str(out), "--set", "prune.iterations=1", "--set", "tune.branches=1",
               "--set", "fixed_lr.enabled=false", "--set", "baseline.epochs=1", "--set", "retrain.epochs=1",
               "--set", "distill.mode=cached", "--set", "distill.cache_actors=2", "--set", "distill.epochs=8")
    # Before the pass: a node without work at that moment (the run's branch is done).
    run.wait_for("parent of the next iteration", timeout=600)
    workers = [n for n in cluster["nodes"].values() if n != "head"]
    assert kill_node(cluster["state"], workers[0]), workers[0]
    # During the pass: the node of one of its two actors, once it has written shards.
    run.wait_for("soft_labels: 2 teachers x 8 epochs on 2 actor(s)", timeout=300)  # baseline + iter1_b0
    shards = out / "soft_labels"
    deadline = time.monotonic() + 300
    while not list(shards.glob("*-values.npy")):
        assert time.monotonic() < deadline and run.proc.poll() is None, run.text[-3000:]
        time.sleep(0.1)
    killed = _kill_a_pool_node(cluster)
    code = run.finish(timeout=900)
    assert code == 0, run.text[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stages"]["soft_labels"]["status"] == "complete"
    meta = json.loads((shards / "meta.json").read_text())
    units = {(s["epoch"], s["shard"]) for s in meta["shards"]}
    assert len(units) == len(meta["shards"]) and {e for e, _ in units} == set(range(8))  # every unit, once
    assert sum(s["count"] for s in meta["shards"] if s["epoch"] == 0) == 1437  # digits' train split
    assert m["snapshots"]["student"]["node_id"] not in (killed,) and "Traceback" not in run.text
