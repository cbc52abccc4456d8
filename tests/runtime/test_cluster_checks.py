"""Cluster checks `kesi run` makes before creating anything: resources the cluster lacks, an output
path some node cannot see. On a local Ray (the session's `ray_local`); the multi-node positive path
runs on a real loopback cluster in tests/test_cluster_run.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kesi_dist.runtime import cluster
from kesi_dist.cli import main
from kesi_dist.errors import RunError

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "kesi" / "smoke.yaml")


def _fake_nodes(here: str) -> list[dict]:
    def node(node_id: str, ip: str, **resources: float) -> dict:
        return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": ip, "Resources": resources}

    return [node(here, "10.0.0.1", CPU=4.0),  # the driver's own node: never asked
            node("aa" * 28, "10.0.0.2", CPU=8.0), node("bb" * 28, "10.0.0.3", GPU=1.0, CPU=8.0),
            node("cc" * 28, "10.0.0.4", memory=1e9),  # no CPUs/GPUs: runs no work, not asked
            {**node("dd" * 28, "10.0.0.5", CPU=8.0), "Alive": False}]


def test_shared_path_names_the_node_that_cannot_see_it(ray_local, monkeypatch, tmp_path):
    here = ray_local.get_runtime_context().get_node_id()
    monkeypatch.setattr(ray_local, "nodes", lambda: _fake_nodes(here))
    asked = []

    def probe(marker, token, nodes, timeout_s):
        asked.append([n["NodeID"] for n in nodes])
        assert Path(marker).read_text() == token and Path(marker).parent == tmp_path / "run"
        return {"aa" * 28: None, "bb" * 28: "the path does not exist there"}

    with pytest.raises(RunError) as e:
        cluster.check_shared_path(str(tmp_path / "run"), probe=probe)
    assert str(e.value) == (
        f"--output {tmp_path / 'run'}: not visible from node 10.0.0.3 ({'bb' * 28}): the path does not exist "
        "there; use a shared filesystem (NFS) mounted at the same path on every node, or a storage URI such "
        "as s3://bucket/runs")
    assert asked == [["aa" * 28, "bb" * 28]]
    assert not (tmp_path / "run").exists(), "the folder the check created is removed again"

    # Every node sees it: the check passes, names who was asked, and leaves an existing folder as it was.
    (tmp_path / "run").mkdir()
    seen = cluster.check_shared_path(tmp_path / "run", probe=lambda m, t, nodes, s: {n["NodeID"]: None for n in nodes})
    assert seen == ["aa" * 28, "bb" * 28]
    assert list((tmp_path / "run").iterdir()) == []
    # Storage URIs are not checked (every node reaches them through the network).
    assert cluster.check_shared_path("s3://bucket/runs/x", probe=probe) == [] and len(asked) == 1


def test_shared_path_real_probe_on_a_node(ray_local, tmp_path):
    """The probe is a 0-CPU task pinned to the node: it reads the marker and writes next to it."""
    node = next(n for n in ray_local.nodes() if n["Alive"])
    marker = tmp_path / ".kesi-shared-check-x"
    marker.write_text("token-1")
    assert cluster._probe_nodes(str(marker), "token-1", [node], 30) == {node["NodeID"]: None}
    assert sorted(p.name for p in tmp_path.iterdir()) == [marker.name], "the probe's own file is removed"
    assert cluster._probe_nodes(str(marker), "token-2", [node], 30) == {
        node["NodeID"]: "it holds a different file at that path"}
    assert cluster._probe_nodes(str(tmp_path / "missing"), "t", [node], 30) == {
        node["NodeID"]: "the path does not exist there"}
    # A single-node Ray has no other node to ask.
    assert cluster.check_shared_path(tmp_path / "run") == []


def test_run_asking_for_missing_gpus_fails_before_anything_is_written(ray_local, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    t = time.monotonic()
    code = main(["run", SMOKE, "--set", "train.gpus_per_worker=1", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - t < 20
    assert err == ("error: config asks for 1 GPUs per trial but the cluster has 0: set train.gpus_per_worker=0 "
                   "or add GPU nodes\n")
    assert not out.exists()
    # Worker groups hold num_workers x the per-worker request.
    code = main(["run", SMOKE, "--set", "train.num_workers=3", "--set", "train.cpus_per_worker=1",
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "config asks for 3 CPUs per trial but the cluster has 2" in err and err.count("\n") == 1
    assert not out.exists()
