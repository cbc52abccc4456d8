"""Killing a `kesi run` as a crash would, for the driver-loss tests: run it in its own session until a
condition on its manifest holds, SIGKILL it, and check that nothing of it survives."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from kesi_dist import storage

ROOT = Path(__file__).resolve().parents[1]


def _manifest(run: Path | str) -> dict | None:
    """The run's manifest (a local folder or a storage URI), None while there is none."""
    try:
        return json.loads(storage.read_text(storage.join(run, "manifest.json")))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _session_pids(sid: int) -> list[int]:
    """Processes still alive in session `sid` (the killed driver's, started with start_new_session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # fields[3] is the session id, fields[0] the state
            pids.append(int(entry.name))
    return pids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# Ray's agents (ray::DashboardAgent, ray::RuntimeEnvAgent), orphaned when their raylet dies, outlive it
# by a minute or two; every other ray:: process is a worker.
AGENTS = ("ray::DashboardA", "ray::RuntimeEnv")


def _gone(sid: int, seconds: float, only: tuple[str, ...] = ()) -> None:
    """Assert that no process of session `sid` (a killed driver's; `only` those whose name starts so, the
    agents apart) is left within `seconds`."""
    deadline = time.time() + seconds

    def left() -> list[int]:
        return [p for p in _session_pids(sid)
                if not only or (_comm(p).startswith(only) and not _comm(p).startswith(AGENTS))]

    while (pids := left()) and time.time() < deadline:
        time.sleep(0.5)
    if not only:
        for pid in pids:  # ours: report them below, but do not leave them running
            os.kill(pid, signal.SIGKILL)
    assert not pids, f"processes of the killed run survived it: {[(p, _comm(p)) for p in pids]}"


def run_until(run: Path | str, when: Callable[[Path | str, dict], bool], what: str, resume: bool, *, config: str,
              sets: tuple[str, ...] = (), timeout: float = 600, driver_only: bool = False,
              logs: Path | None = None, env: dict | None = None) -> tuple[dict, int]:
    """Start `kesi run config --output run sets...` (its own session), SIGKILL it once `when` holds: its
    whole process group, or (`driver_only`) the driver process alone. `run` is a local folder or a
    storage URI (then `logs` is the local folder for the run's log; default: next to the run).

    Returns the manifest as it was at the kill, and the killed session's id. A group kill is checked
    here: nothing of the killed run survives it. After a driver-only kill the caller checks (`_gone`)
    that its local Ray went down by itself: GCS, raylet and workers fate-share with the driver at once;
    Ray's agents, orphaned when their raylet dies, give up on the dead GCS after a minute or two.
    """
    log = (logs or Path(run).parent) / f"{storage.basename(run)}-{what.replace(' ', '_')}.log"
    args = [sys.executable, "-m", "kesi_dist.cli", "run", config, "--output", str(run), *sets]
    with open(log, "w") as out:
        proc = subprocess.Popen(args + (["--resume"] if resume else []), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.time() + timeout
        while True:
            time.sleep(0.2)
            m = _manifest(run)
            if m is not None and when(run, m):
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"{what} not reached in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # a run that already ended (and was reaped) has no pid left
            if driver_only:
                os.kill(proc.pid, signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    at_kill = _manifest(run)
    if not driver_only:
        _gone(proc.pid, 30)
    assert at_kill["status"] == "running", what
    return at_kill, proc.pid
