"""One driver per run folder (`kesi_dist.runs.lease`), on a local folder, a file:// URI and a real
S3-compatible server: a live holder refuses a second driver in one line naming it, a stale one (no
heartbeat; or a process on this host that is gone) is taken over with a warning, the heartbeat moves,
and release deletes only this driver's lease. A second `kesi run` refused while a real first one runs is
in tests/e2e/test_signals.py; the refusal through the CLI, before Ray, in tests/e2e/test_bad_input.py."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kesi_dist import storage
from kesi_dist.errors import UsageError
from kesi_dist.runs.lease import LEASE, Lease, read_lease


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "file":
        return f"file://{tmp_path}/run"
    return request.getfixturevalue("s3").uri("run")


def _plant(root: str, **fields) -> dict:
    """A lease as another driver would have written it."""
    record = {"host": "node-7", "pid": 4242, "pid_start": None, "started": time.time() - 100,
              "heartbeat": time.time(), "token": "theirs", **fields}
    storage.write_text(storage.join(root, LEASE), json.dumps(record))
    return record


def _wait(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_acquire_writes_the_holder_and_release_deletes_it(root):
    lease = Lease.acquire(root)
    try:
        held = read_lease(storage.join(root, LEASE))
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
        assert held["token"] == lease.record["token"] and held["heartbeat"] >= held["started"]
        with pytest.raises(UsageError) as e:  # the same process cannot run the folder twice either
            Lease.acquire(root)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(e.value)
    finally:
        lease.release()
    assert not storage.exists(storage.join(root, LEASE))
    lease.release()  # idempotent


def test_a_live_holder_is_refused_in_one_line_naming_it(root):
    _plant(root)
    with pytest.raises(UsageError) as e:
        Lease.acquire(root)
    text = str(e.value)
    assert "\n" not in text and "another kesi driver is running this run" in text
    assert re.search(r"pid 4242 on node-7, started [\d-]+ [\d:]+, last heartbeat \d+ s ago", text) and "--resume" in text
    assert read_lease(storage.join(root, LEASE))["token"] == "theirs"  # untouched


def test_a_holder_without_heartbeat_is_taken_over_with_a_warning(root, monkeypatch, capsys):
    monkeypatch.setenv("KESI_LEASE_STALE_S", "30")
    _plant(root, heartbeat=time.time() - 31)
    lease = Lease.acquire(root)
    try:
        err = capsys.readouterr().err
        assert "warning:" in err and "taking over the lease of the driver pid 4242 on node-7" in err
        assert re.search(r"no heartbeat for 3\d s", err) and err.count("\n") == 1
        assert read_lease(storage.join(root, LEASE))["token"] == lease.record["token"]
    finally:
        lease.release()


def test_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = str(tmp_path / "run")
    _plant(root, host=socket.gethostname(), pid=int(gone.stdout))  # fresh heartbeat, but its process has exited
    lease = Lease.acquire(root)
    lease.release()
    assert "that process is gone" in capsys.readouterr().err


def test_the_heartbeat_moves_and_a_lease_taken_over_is_not_deleted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KESI_LEASE_STALE_S", "0.4")  # a beat every 0.1 s
    root = str(tmp_path / "run")
    lease = Lease.acquire(root)
    path = storage.join(root, LEASE)
    first = read_lease(path)["heartbeat"]
    _wait(lambda: read_lease(path)["heartbeat"] > first, "the heartbeat never moved")
    _plant(root, heartbeat=time.time() + 3600)  # another driver took over (this one was thought dead)
    _wait(lambda: not lease._thread.is_alive(), "the heartbeat did not notice it lost the lease")
    assert "another driver took over this run's lease (pid 4242 on node-7" in capsys.readouterr().err
    lease.release()
    assert read_lease(path)["token"] == "theirs"


def test_an_unreadable_lease_is_taken_over(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    (root / LEASE).write_text("{not json")
    lease = Lease.acquire(str(root))
    lease.release()
    assert "unreadable lease, taken over" in capsys.readouterr().err


def test_a_killed_driver_not_yet_reaped_counts_as_gone(tmp_path, capsys):
    """A driver SIGKILLed a moment ago whose parent has not waited for it yet (a zombie) holds nothing."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        root = str(tmp_path / "run")
        _plant(root, host=socket.gethostname(), pid=proc.pid)
        with pytest.raises(UsageError):  # alive: refused
            Lease.acquire(root)
        proc.kill()
        _wait(lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "Z", "no zombie")
        Lease.acquire(root).release()
        assert "that process is gone" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()
