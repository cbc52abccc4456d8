"""`kesi run` on a real multi-node Ray cluster (cluster/local-cluster.sh: a 0-CPU head plus five
1-CPU worker nodes on loopback, token auth on), as a user runs it:

- submitted with `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`: it succeeds,
  its branches ran on several nodes (recorded per snapshot), its log reads as progress lines;
- a job asking for GPUs the cluster lacks ends FAILED within seconds with a one-line error;
- worker nodes are killed (SIGKILL of a whole `ray start` session) under one run three times: the
  baseline's node mid-baseline (a Ray task, num_workers=0), a branch's node while it retrains (a Tune
  trial), and the node of one of the soft-label pool's two actors while the pass computes; the run
  still completes, the lost training restarts from its last epoch checkpoint on a surviving node, the
  pass loses no unit, and the manifest records the retries;
- a node is killed while the student distils on a Ray Train worker group (num_workers=1): the group
  restarts from its last epoch checkpoint on a surviving node.

The tests share one cluster and run in file order: the node-loss tests kill four of its five workers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.localcluster import RAY, REPO, client_env, job_wait, kill_node, local_cluster, sh

pytestmark = pytest.mark.slow

SMOKE = "configs/kesi/smoke.yaml"


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(workers=5) as c:
        c["env"] = client_env(**c["auth"], RAY_ADDRESS=c["state"]["dashboard_url"])
        c["nodes"] = _nodes(c["env"])
        yield c


def _nodes(env: dict) -> dict[str, str]:
    """node id -> "head" / "worker<i>" for the cluster's alive nodes (from its state API)."""
    r = sh(RAY, "list", "nodes", "--format", "json", "--filter", "state=ALIVE", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = {}
    for n in json.loads(r.stdout):
        names = [k for k in n["resources_total"] if k.startswith(("kesi_worker_", "kesi_head"))]
        out[n["node_id"]] = "head" if names == ["kesi_head"] else names[0].replace("kesi_worker_", "worker")
    return out


def _submit(cluster: dict, job_id: str, *kesi_args: str) -> None:
    r = sh(RAY, "job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".",
           "--runtime-env", "cluster/runtime_env.yaml", "--", "kesi", *kesi_args, env=cluster["env"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _job_logs(cluster: dict, job_id: str) -> str:
    """The job's own output (`ray job logs`), without the CLI's header line."""
    r = sh(RAY, "job", "logs", job_id, env=cluster["env"])
    return "\n".join(ln for ln in r.stdout.splitlines() if "Job submission server address" not in ln)


@pytest.mark.timeout(1500)
def test_job_submit_runs_the_smoke_config_across_nodes(cluster, tmp_path):
    out = tmp_path / "smoke"
    job_id = f"kesi-smoke-{os.getpid()}"
    # The smoke config, one iteration (its two branches + the fixed-LR arm: three 1-CPU trials) and
    # short schedules: every stage still runs, in a fraction of the time.
    _submit(cluster, job_id, "run", SMOKE, "--output", str(out), "--set", "prune.iterations=1",
            "--set", "baseline.epochs=2", "--set", "retrain.epochs=1", "--set", "fixed_lr.epochs=1",
            "--set", "distill.epochs=1", "--set", "distill.mode=online")
    status = job_wait(cluster["state"]["dashboard_url"], job_id, cluster["env"], timeout=1200)
    logs = _job_logs(cluster, job_id)
    assert status == "succeeded", logs[-4000:]

    m = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert m["status"] == "complete" and report["student"]["val_acc"] > 0
    nodes, snaps = cluster["nodes"], m["snapshots"]
    # The driver ran on the head (`ray job submit` runs entrypoints there) and connected to the
    # cluster: every recorded node is one of the cluster's, none a private local Ray's.
    assert {s["node_id"] for s in snaps.values()} <= set(nodes), {n: s["node_id"] for n, s in snaps.items()}
    # num_workers=0: the baseline and the student train in a Ray task holding a worker's CPU, never in the
    # driver (the head has no CPU for work here, and on a GPU cluster no GPU)
    assert nodes[snaps["baseline"]["node_id"]].startswith("worker"), nodes[snaps["baseline"]["node_id"]]
    assert nodes[snaps["student"]["node_id"]].startswith("worker"), nodes[snaps["student"]["node_id"]]
    branch_nodes = {nodes[s["node_id"]] for s in snaps.values() if s["arm"] in ("onecycle", "fixed")}
    # Each branch trial holds 1 CPU and the head has none: they ran on the worker nodes, several of them.
    assert all(n.startswith("worker") for n in branch_nodes) and len(branch_nodes) > 1, branch_nodes
    assert all(s.get("attempts") == 1 for s in snaps.values()), {n: s.get("attempts") for n, s in snaps.items()}

    # The job log reads as progress lines, without Ray's worker logs or Tune's tables.
    assert "output " + str(out) + ": visible from all 5 other node(s)" in logs
    for text in ("baseline epoch 1/2", "prune_1", "iter1_b0 epoch", "iter1_fixed done", "val acc", "student",
                 "done: report in"):
        assert text in logs, (text, logs[-3000:])
    for noise in ("Traceback", "pid=", "Trial status", "RayTrainWorker", "ImplicitFunc", "RAY_AUTH_MODE=disabled"):
        assert noise not in logs, (noise, logs[-3000:])


def test_job_asking_for_missing_gpus_fails_fast_with_one_line(cluster, tmp_path):
    out = tmp_path / "gpu"
    job_id = f"kesi-gpu-{os.getpid()}"
    t = time.monotonic()
    _submit(cluster, job_id, "run", SMOKE, "--set", "train.gpus_per_worker=1", "--output", str(out))
    status = job_wait(cluster["state"]["dashboard_url"], job_id, cluster["env"], timeout=120)
    logs = _job_logs(cluster, job_id)
    assert status == "failed" and time.monotonic() - t < 90, logs[-3000:]
    errors = [ln for ln in logs.splitlines() if ln.startswith("error:")]
    assert errors == ["error: config asks for 1 GPUs per trial but the cluster has 0: set train.gpus_per_worker=0 "
                      "or add GPU nodes"], logs[-3000:]
    assert "Traceback" not in logs
    assert not out.exists(), "nothing is written before the check"
    r = sh(RAY, "job", "status", job_id, env=cluster["env"])
    assert "failed with exit code 1" in r.stdout + r.stderr, r.stdout + r.stderr  # kesi's run-time error code


# ----------------------------------------------------------------------------------------------
# node loss

class _Run:
    """`kesi run` as a driver attached to the cluster (RAY_ADDRESS = the GCS), output streamed."""

    def __init__(self, cluster: dict, *args: str):
        env = client_env(**cluster["auth"], RAY_ADDRESS=cluster["state"]["gcs_address"], PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "kesi_dist.cli", "run", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            assert self.proc.poll() is None or self._reader.is_alive(), f"run ended before {text!r}: {self.text[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s: {self.text[-3000:]}"
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in ln for ln in self.lines)


def _alive(cluster: dict, what: str, name: str, kind: str = "actors") -> list[str]:
    """Worker nodes running an alive actor (or a running task) whose class (task) name contains `name`."""
    state = "ALIVE" if kind == "actors" else "RUNNING"
    r = sh(RAY, "list", kind, "--format", "json", "--detail", "--filter", f"state={state}", "--limit", "1000",
           env=cluster["env"])
    rows = json.loads(r.stdout) if r.stdout.lstrip().startswith("[") else []
    key = "class_name" if kind == "actors" else "name"
    hosts = sorted({row["node_id"] for row in rows if name in (row.get(key) or "")}
                   - {n for n, node in cluster["nodes"].items() if node == "head"})
    assert hosts, (what, rows)
    return hosts


def _kill(cluster: dict, node_id: str) -> str:
    """SIGKILL a worker node's whole `ray start` session, as when a machine is lost."""
    assert kill_node(cluster["state"], cluster["nodes"][node_id]), f"{cluster['nodes'][node_id]}: no process to kill"
    return node_id


TINY = ["--set", "prune.iterations=1", "--set", "tune.branches=1", "--set", "fixed_lr.enabled=false"]


@pytest.fixture(scope="module")
def node_loss(cluster, tmp_path_factory):
    """One run that loses the baseline's node, its only branch's node and a soft-label actor's node."""
    out = tmp_path_factory.mktemp("nodeloss") / "run"
    run = _Run(cluster, SMOKE, "--output", str(out), *TINY, "--set", "baseline.epochs=3", "--set", "retrain.epochs=4",
               "--set", "distill.mode=cached", "--set", "distill.cache_actors=2", "--set", "distill.epochs=8")
    killed = {}
    # 1. The baseline's node, after its first epoch (its Ray task holds a worker's CPU).
    run.wait_for("baseline epoch 1/3", timeout=600)
    assert not run.count("baseline epoch 3/3"), "the baseline finished before its node could be killed"
    killed["baseline"] = _kill(cluster, _alive(cluster, "baseline", "_train_placed", kind="tasks")[0])
    # 2. The branch's node, after its first epoch (trained in its Tune trial: ImplicitFunc is Tune's actor).
    run.wait_for("iter1_b0 epoch 1/4", timeout=600)
    assert not run.count("iter1_b0 epoch 4/4"), "the branch finished before its node could be killed"
    killed["branch"] = _kill(cluster, _alive(cluster, "branch", "ImplicitFunc")[0])
    # 3. During the pass: the node of one of the pool's two actors, once shards are being written.
    run.wait_for("soft_labels: 2 teachers x 8 epochs on 2 actor(s)", timeout=600)  # baseline + iter1_b0
    deadline = time.monotonic() + 300
    while not list((out / "soft_labels").glob("*-values.npy")):
        assert time.monotonic() < deadline and run.proc.poll() is None, run.text[-3000:]
        time.sleep(0.1)
    killed["pool"] = _kill(cluster, _alive(cluster, "soft-label pool", "_Host")[0])
    code = run.finish(timeout=900)
    return {"out": out, "run": run, "code": code, "killed": killed}


@pytest.mark.timeout(2400)
def test_baseline_branch_and_soft_label_pass_survive_losing_their_nodes(cluster, node_loss):
    run, out, killed = node_loss["run"], node_loss["out"], node_loss["killed"]
    assert node_loss["code"] == 0, run.text[-4000:]
    assert "Traceback" not in run.text, run.text[-3000:]  # each loss is one line, not Tune's traceback
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stages"]["soft_labels"]["status"] == "complete"
    events = [e["event"] for e in m["events"]]

    # The baseline's Ray task ran twice, the second time on another node, after its last epoch checkpoint:
    # epoch 1 was not trained twice.
    base = m["snapshots"]["baseline"]
    assert base["node_id"] != killed["baseline"] and base["attempts"] == 2
    assert re.search(r"baseline: worker group restarted, resuming at epoch [23]", run.text), run.text[-3000:]
    assert run.count("baseline epoch 1/3") == 1 and run.count("baseline epoch 3/3") == 1, run.text[-3000:]

    # The branch restarted once, on a node still alive, registered exactly once, from its last epoch
    # checkpoint: epoch 1 was not trained again, the last one ran once.
    b0 = m["snapshots"]["iter1_b0"]
    assert b0["attempts"] == 2 and b0["node_id"] not in killed.values()
    assert cluster["nodes"][b0["node_id"]].startswith("worker") and (out / b0["checkpoint"]).is_file()
    assert events.count("branch iter1_b0 retried") == 1 and events.count("snapshot iter1_b0") == 1, events
    assert run.count("iter1_b0 epoch 1/4") == 1 and run.count("iter1_b0 epoch 4/4") == 1, run.text[-3000:]
    assert run.count("iter1_b0 lost") == 1 and "restarting from its last epoch checkpoint" in run.text

    # The pass finished without the lost actor: every unit once (a lost actor's unit goes back to the
    # queue), digits' 1437 training images less the held-out ones labelled once per epoch.
    meta = json.loads((out / "soft_labels" / "meta.json").read_text())
    units = {(s["epoch"], s["shard"]) for s in meta["shards"]}
    assert len(units) == len(meta["shards"]) and {e for e, _ in units} == set(range(8))
    held = m["stages"]["data"]["holdout"]
    assert sum(s["count"] for s in meta["shards"] if s["epoch"] == 0) == held["train_size"] == 1437 - held["size"]
    assert held["size"] > 0 and meta["holdout"]["size"] == held["size"]
    assert m["snapshots"]["student"]["node_id"] not in killed.values()
    assert list(m["snapshots"]) == ["baseline", "iter1_b0", "student"]


@pytest.mark.timeout(1500)
def test_distillation_survives_losing_its_node(cluster, node_loss, tmp_path):
    """The student trains on a Ray Train worker group (num_workers=1); its node is killed mid-way."""
    first = node_loss["out"]
    out = tmp_path / "distill"
    lost = set(node_loss["killed"].values())
    alive = [name for n, name in cluster["nodes"].items() if name != "head" and n not in lost]
    assert len(alive) == 2, alive
    run = _Run(cluster, SMOKE, "--output", str(out), *TINY, "--set", "train.num_workers=1",
               "--set", "data.source=prepared", "--set", f"data.prepared={first / 'data'}",
               "--set", f"baseline.checkpoint={first / 'snapshots' / 'baseline.pt'}",
               "--set", "retrain.epochs=1", "--set", "distill.mode=online", "--set", "distill.epochs=6")
    # Ray Train registers a reported checkpoint asynchronously: killed right after epoch 1, the group may
    # restart from scratch. After epoch 2, epoch 1's checkpoint is registered.
    run.wait_for("distill epoch 2/6", timeout=600)
    assert not run.count("distill epoch 6/6"), "distillation finished before the node could be killed"
    killed = _kill(cluster, _alive(cluster, "distillation", "RayTrainWorker")[0])
    code = run.finish(timeout=600)
    assert code == 0, run.text[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    student = m["snapshots"]["student"]
    assert student["attempts"] == 2 and student["node_id"] != killed, student
    assert [e["event"] for e in m["events"]].count("distill retried") == 1
    resumed = re.search(r"distill: worker group restarted, resuming at epoch (\d+)", run.text)
    assert resumed and int(resumed.group(1)) >= 2, run.text[-3000:]  # from a checkpoint, not from scratch
    assert run.count("distill epoch 1/6") == 1 and run.count("distill epoch 6/6") == 1, run.text[-3000:]
