"""A real multi-node Ray cluster on this machine for tests: `cluster/local-cluster.sh` up/down, the
environment a client needs to reach it, and the process bookkeeping that proves `down` left nothing.

Shared by the test modules that need a cluster (each starts its own, once per module: a test that
kills a node must not break another module's cluster).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "cluster" / "local-cluster.sh"
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")

__all__ = ["REPO", "SCRIPT", "BIN", "RAY", "AUTH_VARS", "client_env", "sh", "sessions", "alive", "local_cluster",
           "kill_node", "job_wait", "cluster_pids"]


def client_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any Ray address/auth settings, plus `extra`."""
    out = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    out.update(PATH=f"{BIN}:{out.get('PATH', '')}", RAY=str(RAY), **extra)
    return out


def sh(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env or client_env(), cwd=REPO)


def sessions(state: dict) -> dict[int, set[int]]:
    """Live pids per recorded session id."""
    out: dict[int, set[int]] = {n["sid"]: set() for n in state["nodes"]}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                sid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[3])
            except (OSError, IndexError):
                continue
            if sid in out:
                out[sid].add(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        return "Z" not in (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False


def cluster_pids(d: Path) -> list[int]:
    """Live processes whose command line mentions the cluster folder (raylets, workers, agents)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(d).encode() in (p / "cmdline").read_bytes() and alive(int(p.name)):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


@contextlib.contextmanager
def local_cluster(workers: int = 2) -> Iterator[dict]:
    """Start a head (0 CPUs) + `workers` 1-CPU worker nodes; stop them (and check) on exit.

    Yields {"dir", "state", "up_stdout", "auth"}: `auth` is the client environment for the token.
    """
    # Short path: Ray's unix sockets live under it (107-byte limit).
    d = Path(tempfile.mkdtemp(prefix="kc", dir="/tmp"))
    try:
        r = sh(SCRIPT, "up", "--workers", str(workers), "--dir", d, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        state = json.loads((d / "state.json").read_text())
        yield {"dir": d, "state": state, "up_stdout": r.stdout,
               "auth": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(d / "auth_token")}}
    finally:
        down = sh(SCRIPT, "down", "--dir", d, timeout=120)
        left = cluster_pids(d)
        # Last resort if `down` itself failed: kill what is left of the recorded sessions only.
        state_file = d / "state.json"
        if state_file.exists():
            for pids in sessions(json.loads(state_file.read_text())).values():
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
    # Only reached when the body did not raise: the teardown itself is checked.
    assert down.returncode == 0 and not left, f"`down` left Ray processes {left}: {down.stderr[-2000:]}"


def kill_node(state: dict, name: str) -> set[int]:
    """SIGKILL every process of node `name` (its `ray start` session: raylet, workers, agents),
    as when a machine is lost. Returns the pids killed."""
    node = next(n for n in state["nodes"] if n["name"] == name)
    pids = sessions(state)[node["sid"]]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def job_wait(url: str, job_id: str, env: dict, timeout: float) -> str:
    """Wait for a Ray job to end; returns "succeeded", "failed" or "was stopped" (None on timeout)."""
    done = re.compile(rf"Job '{re.escape(job_id)}' (succeeded|failed|was stopped)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sh(RAY, "job", "status", "--address", url, job_id, env=env)
        final = done.search(re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr))
        if final:
            return final.group(1)
        time.sleep(2)
    return None
