"""cluster/local-cluster.sh starts a real head + 2 worker Ray nodes with token auth; kesi_dist.cluster
connects to it (or fails fast, saying why); `down` stops exactly what `up` started."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from kesi_dist.runtime.cluster import connect_ray, token_source
from kesi_dist.errors import RunError, UsageError

from tests.localcluster import AUTH_VARS as _AUTH_VARS
from tests.localcluster import RAY, REPO, SCRIPT, local_cluster
from tests.localcluster import alive as _alive
from tests.localcluster import client_env as _env
from tests.localcluster import sessions as _sessions
from tests.localcluster import sh as _sh


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(workers=2) as c:
        yield c


@pytest.mark.slow
def test_up_prints_exports_and_is_idempotent(cluster):
    d, state = cluster["dir"], cluster["state"]
    assert [n["name"] for n in state["nodes"]] == ["head", "worker1", "worker2"]
    assert all(n["pid"] == n["sid"] for n in state["nodes"]), "each node leads its own session"
    assert state["dashboard_url"].startswith("http://127.0.0.1:")
    assert f"source {d}/env.sh" in cluster["up_stdout"]
    assert f"export RAY_ADDRESS={state['dashboard_url']}" in cluster["up_stdout"]
    assert f"export RAY_AUTH_TOKEN_PATH={d}/auth_token" in cluster["up_stdout"]
    env_sh = (d / "env.sh").read_text()
    assert f"export RAY_ADDRESS={state['dashboard_url']}" in env_sh
    assert "export RAY_AUTH_MODE=token" in env_sh and f"RAY_AUTH_TOKEN_PATH={d}/auth_token" in env_sh
    assert (d / "auth_token").stat().st_mode & 0o077 == 0, "token readable by others"
    token = (d / "auth_token").read_text()
    assert len(token) == 64 and token not in cluster["up_stdout"] + env_sh
    # Re-running `up` finds the same live cluster and starts nothing new.
    r = _sh(SCRIPT, "up", "--workers", "2", "--dir", d)
    assert r.returncode == 0 and "already up" in r.stderr
    assert json.loads((d / "state.json").read_text()) == state
    r = _sh(SCRIPT, "up", "--workers", "3", "--dir", d)
    assert r.returncode == 2 and "already up with 2 workers" in r.stderr
    r = _sh(SCRIPT, "status", "--dir", d)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("state: ALIVE") == 3 and r.stdout.count("is_head_node: true") == 1, r.stdout
    assert "kesi_worker_1: 1.0" in r.stdout and "kesi_worker_2: 1.0" in r.stdout


@pytest.mark.slow
def test_tasks_pinned_to_each_worker_node(cluster):
    code = textwrap.dedent("""
        import json, sys, ray
        from kesi_dist.runtime.cluster import connect_ray, check_resources
        from kesi_dist.errors import RunError
        connect_ray(sys.argv[1], timeout_s=30)

        @ray.remote(num_cpus=1)
        def where():
            return ray.get_runtime_context().get_node_id()

        refs = [where.options(resources={f"kesi_worker_{i}": 1}).remote() for i in (1, 2)]
        out = {"workers": ray.get(refs, timeout=60),
               "head": [n["NodeID"] for n in ray.nodes() if n["Alive"] and "kesi_head" in n["Resources"]]}
        check_resources(0, 2)
        try:
            check_resources(2, 1)
        except RunError as e:
            out["gpu_error"] = str(e)
        print("RESULT " + json.dumps(out))
    """)
    r = _sh(sys.executable, "-c", code, cluster["state"]["gcs_address"], env=_env(**cluster["auth"]), timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert len(set(out["workers"])) == 2, out
    assert len(out["head"]) == 1 and out["head"][0] not in out["workers"]
    assert out["gpu_error"] == ("config asks for 2 GPUs per trial but the cluster has 0: "
                                "set train.gpus_per_worker=0 or add GPU nodes")


@pytest.mark.slow
def test_job_submit_with_token(cluster, tmp_path):
    (tmp_path / "script.py").write_text(textwrap.dedent("""
        import ray
        from kesi_dist.runtime.cluster import connect_ray
        connect_ray(None)  # under `ray job submit`: RAY_ADDRESS points at the GCS
        nodes = [n for n in ray.nodes() if n["Alive"]]
        names = sorted(k for n in nodes for k in n["Resources"] if k.startswith("kesi_"))
        print(f"JOB-NODES {len(nodes)} {','.join(names)} CPU={ray.cluster_resources()['CPU']:g}")
    """))
    env = _env(**cluster["auth"])
    url = cluster["state"]["dashboard_url"]
    job_id = f"kesi-test-{os.getpid()}-{time.time_ns()}"
    r = _sh(RAY, "job", "submit", "--address", url, "--no-wait", "--submission-id", job_id,
            "--working-dir", tmp_path, "--", "python", "script.py", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # `ray job status` prints "Job '<id>' succeeded" / "... failed" / "... was stopped" when done.
    done = re.compile(rf"Job '{job_id}' (succeeded|failed|was stopped)")
    deadline, final = time.monotonic() + 120, None
    while final is None and time.monotonic() < deadline:
        r = _sh(RAY, "job", "status", "--address", url, job_id, env=env)
        final = done.search(re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr))
        if final is None:
            time.sleep(1)
    logs = _sh(RAY, "job", "logs", "--address", url, job_id, env=env).stdout
    assert final and final.group(1) == "succeeded", logs[-3000:]
    assert "JOB-NODES 3 kesi_head,kesi_worker_1,kesi_worker_2 CPU=2" in logs, logs[-3000:]


@pytest.mark.slow
def test_auth_is_enforced(cluster, tmp_path):
    url = cluster["state"]["dashboard_url"]
    (tmp_path / "s.py").write_text("print('should never run')\n")
    submit = (RAY, "job", "submit", "--address", url, "--no-wait", "--working-dir", tmp_path, "--", "python", "s.py")
    no_token = _env(HOME=str(tmp_path))  # no RAY_AUTH_*, no ~/.ray/auth_token
    r = _sh(*submit, env=no_token)
    assert r.returncode != 0 and "Unauthorized: Missing authentication token" in r.stderr, r.stderr[-2000:]
    wrong = _env(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    r = _sh(*submit, env=wrong)
    assert r.returncode != 0 and "Invalid authentication token" in r.stderr, r.stderr[-2000:]
    r = _sh(RAY, "job", "list", "--address", url, env=_env(**cluster["auth"]))
    assert r.returncode == 0 and "should never run" not in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("auth", [{}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}], ids=["none", "wrong"])
def test_connect_ray_rejected_token_fails_fast(cluster, auth):
    code = textwrap.dedent("""
        import sys, time
        from kesi_dist.runtime.cluster import connect_ray
        from kesi_dist.errors import RunError
        t = time.monotonic()
        try:
            connect_ray(sys.argv[1], timeout_s=10)
        except RunError as e:
            print(f"RUNERROR {time.monotonic() - t:.2f} {e}")
    """)
    r = _sh(sys.executable, "-c", code, cluster["state"]["gcs_address"], env=_env(**auth), timeout=60)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RUNERROR")), None)
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    _, seconds, msg = line.split(" ", 2)
    assert float(seconds) < 10
    assert cluster["state"]["gcs_address"] in msg and "RAY_AUTH_TOKEN_PATH" in msg and "~/.ray/auth_token" in msg
    assert "0" * 64 not in msg, "the token must never be printed"


@pytest.mark.slow
def test_connect_ray_to_a_port_that_is_not_a_gcs_fails_fast(cluster):
    # host:port of the dashboard: it accepts TCP but never answers as a GCS.
    address = cluster["state"]["dashboard_url"].removeprefix("http://")
    code = textwrap.dedent("""
        import sys, time
        from kesi_dist.runtime.cluster import connect_ray
        from kesi_dist.errors import RunError
        t = time.monotonic()
        try:
            connect_ray(sys.argv[1], timeout_s=3)
        except RunError as e:
            print(f"RUNERROR {time.monotonic() - t:.2f} {e}")
    """)
    r = _sh(sys.executable, "-c", code, address, env=_env(**cluster["auth"]), timeout=60)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RUNERROR")), None)
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    _, seconds, msg = line.split(" ", 2)
    assert float(seconds) < 10 and "not as a Ray GCS" in msg and address in msg  # 3 s + a loaded machine


@pytest.mark.slow
def test_down_stops_only_what_up_started(cluster):
    d = cluster["dir"]
    state = json.loads((d / "state.json").read_text())
    sessions = _sessions(state)
    ours = set().union(*sessions.values())
    assert all(sessions.values()) and len(ours) > 10, sessions
    # Every process that mentions the cluster's dir (raylets, workers, agents) is in a recorded session.
    mentioning = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(d).encode() in (p / "cmdline").read_bytes():
                    mentioning.add(int(p.name))
            except OSError:
                pass
    assert mentioning and mentioning <= ours, mentioning - ours
    # A decoy named like a raylet, in its own session: `ray stop` would kill it, `down` must not.
    decoy = subprocess.Popen(["bash", "-c", "exec -a /opt/ray/core/src/ray/raylet/raylet sleep 300"],
                             start_new_session=True)
    try:
        t = time.monotonic()
        r = _sh(SCRIPT, "down", "--dir", d, timeout=120)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t < 60
        assert not [p for p in ours if _alive(p)], "processes survived down"
        assert decoy.poll() is None, "down killed an unrelated process"
        assert not (d / "state.json").exists()
        r = _sh(SCRIPT, "status", "--dir", d)
        assert r.returncode == 1 and "not running" in r.stdout
    finally:
        decoy.kill()
        decoy.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_ray_unreachable_fails_fast(monkeypatch):
    for var in _AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    port = _free_port()
    t = time.monotonic()
    with pytest.raises(RunError, match=rf"cannot reach the Ray cluster at 127\.0\.0\.1:{port} .*RAY_ADDRESS"):
        connect_ray(f"127.0.0.1:{port}", timeout_s=5)
    assert time.monotonic() - t < 5


def test_connect_ray_bad_addresses_and_token_sources(monkeypatch, tmp_path):
    for var in _AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="dashboard/job-submission URL"):
        connect_ray("http://127.0.0.1:8265")
    with pytest.raises(UsageError, match="expected host:port"):
        connect_ray("headnode")
    with pytest.raises(UsageError, match="ray://"):
        connect_ray("ray://10.0.0.1:10001")
    # Token mode with a token file that is not there: Ray would abort the process; we raise.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(RunError, match="RAY_AUTH_TOKEN_PATH=.*missing: no such file"):
        connect_ray(f"127.0.0.1:{_free_port()}", timeout_s=5)
    (tmp_path / "tok").write_text("abc")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert token_source() == f"RAY_AUTH_TOKEN_PATH={tmp_path / 'tok'}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-value")
    assert token_source() == "RAY_AUTH_TOKEN"  # precedence as in Ray; the value is never returned
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RunError, match="no token found"):
        token_source()


@pytest.mark.slow
def test_interrupted_up_leaves_nothing_running():
    d = Path(tempfile.mkdtemp(prefix="kc", dir="/tmp"))
    try:
        proc = subprocess.Popen([str(SCRIPT), "up", "--workers", "2", "--dir", str(d)], env=_env(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Interrupt while the head is still starting (launched, not yet recorded in state.json).
        deadline = time.monotonic() + 60
        while not (d / "starting.pid").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        leader = int((d / "starting.pid").read_text().split()[0])
        time.sleep(2)  # let it spawn gcs_server and friends
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "stopped" in err, err
        assert not _alive(leader)
        left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, d)]
        assert not left, f"processes of the interrupted cluster still running: {left}"
    finally:
        subprocess.run([str(SCRIPT), "down", "--dir", str(d)], env=_env(), timeout=120, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def _mentions(proc_dir: Path, d: Path) -> bool:
    try:
        return str(d).encode() in (proc_dir / "cmdline").read_bytes() and _alive(int(proc_dir.name))
    except OSError:
        return False
