"""`kesi run` on a real multi-node Ray cluster (cluster/local-cluster.sh: a 0-CPU head plus three
1-CPU worker nodes on loopback, token auth on), as a user runs it:

- submitted with `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`: it succeeds,
  its branches ran on several nodes (recorded per snapshot), its log reads as progress lines;
- a job asking for GPUs the cluster lacks ends FAILED within seconds with a one-line error;
- a worker node is killed (SIGKILL of its whole `ray start` session) while a branch retrains, and later
  while the student distils: the run still completes, the lost work restarts from its last epoch
  checkpoint on a surviving node, and the manifest records the retry.

The tests share one cluster and run in file order: the node-loss tests each kill one worker node.
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
    with local_cluster(workers=3) as c:
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
    assert "output " + str(out) + ": visible from all 3 other node(s)" in logs
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


def _kill_node_running(cluster: dict, actor_class: str) -> str:
    """Find the worker node where an alive actor of `actor_class` runs and SIGKILL that whole node."""
    r = sh(RAY, "list", "actors", "--format", "json", "--detail", "--filter", "state=ALIVE", "--limit", "1000",
           env=cluster["env"])
    actors = json.loads(r.stdout) if r.stdout.lstrip().startswith("[") else []
    hosts = {a["node_id"] for a in actors if actor_class in a["class_name"]}
    names = [cluster["nodes"][h] for h in hosts if cluster["nodes"].get(h, "head") != "head"]
    assert len(names) == 1, (actor_class, names, [(a["class_name"], a["node_id"]) for a in actors])
    assert kill_node(cluster["state"], names[0]), f"{names[0]}: no process to kill"
    return next(h for h in hosts if cluster["nodes"][h] == names[0])


TINY = ["--set", "prune.iterations=1", "--set", "tune.branches=1", "--set", "fixed_lr.enabled=false"]


@pytest.fixture(scope="module")
def branch_loss(cluster, tmp_path_factory):
    """A run whose only branch loses its node after its first epoch (trained in its Tune trial)."""
    out = tmp_path_factory.mktemp("nodeloss") / "branch"
    run = _Run(cluster, SMOKE, "--output", str(out), *TINY, "--set", "baseline.epochs=1",
               "--set", "retrain.epochs=4", "--set", "distill.enabled=false")
    run.wait_for("iter1_b0 epoch 1/4", timeout=300)
    assert not run.count("iter1_b0 epoch 4/4"), "the branch finished before the node could be killed"
    killed = _kill_node_running(cluster, "ImplicitFunc")  # Tune's actor for a function trial
    code = run.finish(timeout=600)
    return {"out": out, "run": run, "code": code, "killed": killed}


@pytest.mark.timeout(1500)
def test_branch_survives_losing_its_node(cluster, branch_loss):
    run, out, killed = branch_loss["run"], branch_loss["out"], branch_loss["killed"]
    assert branch_loss["code"] == 0, run.text[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    b0 = m["snapshots"]["iter1_b0"]
    # Restarted once, on a node that is still alive, and registered exactly once.
    assert b0["attempts"] == 2 and b0["node_id"] != killed and cluster["nodes"][b0["node_id"]].startswith("worker")
    events = [e["event"] for e in m["events"]]
    assert events.count("branch iter1_b0 retried") == 1 and events.count("snapshot iter1_b0") == 1, events
    assert list(m["snapshots"]) == ["baseline", "iter1_b0"] and (out / b0["checkpoint"]).is_file()
    # It continued from its last epoch checkpoint: epoch 1 was not trained again, the last one ran once.
    assert run.count("iter1_b0 epoch 1/4") == 1 and run.count("iter1_b0 epoch 4/4") == 1, run.text[-3000:]
    assert run.count("iter1_b0 lost") == 1 and "restarting from its last epoch checkpoint" in run.text
    assert "Traceback" not in run.text, run.text[-3000:]  # the loss is one line, not Tune's traceback


@pytest.mark.timeout(1500)
def test_distillation_survives_losing_its_node(cluster, branch_loss, tmp_path):
    """The student trains on a Ray Train worker group (num_workers=1); its node is killed mid-way."""
    first = branch_loss["out"]
    out = tmp_path / "distill"
    alive = [n for n in cluster["nodes"].values() if n != "head" and n != cluster["nodes"].get(branch_loss["killed"])]
    assert len(alive) == 2, alive
    run = _Run(cluster, SMOKE, "--output", str(out), *TINY, "--set", "train.num_workers=1",
               "--set", "data.source=prepared", "--set", f"data.prepared={first / 'data'}",
               "--set", f"baseline.checkpoint={first / 'snapshots' / 'baseline.pt'}",
               "--set", "retrain.epochs=1", "--set", "distill.mode=online", "--set", "distill.epochs=6")
    # Ray Train registers a reported checkpoint asynchronously: killed right after epoch 1, the group may
    # restart from scratch. After epoch 2, epoch 1's checkpoint is registered.
    run.wait_for("distill epoch 2/6", timeout=400)
    assert not run.count("distill epoch 6/6"), "distillation finished before the node could be killed"
    killed = _kill_node_running(cluster, "RayTrainWorker")
    code = run.finish(timeout=600)
    assert code == 0, run.text[-4000:]
    m = json.loads((out / "manifest.json").read_text())
    student = m["snapshots"]["student"]
    assert student["attempts"] == 2 and student["node_id"] != killed, student
    assert [e["event"] for e in m["events"]].count("distill retried") == 1
    resumed = re.search(r"distill: worker group restarted, resuming at epoch (\d+)", run.text)
    assert resumed and int(resumed.group(1)) >= 2, run.text[-3000:]  # from a checkpoint, not from scratch
    assert run.count("distill epoch 1/6") == 1 and run.count("distill epoch 6/6") == 1, run.text[-3000:]
