"""One driver per run folder: `<run>/lease.json`, held by the driver that writes the run.

    lease = Lease.acquire(run_root)    # refuses a live holder; takes over a stale one with a warning
    ...                                # a daemon thread refreshes the heartbeat every HEARTBEAT_S
    lease.release()                    # deleted when the driver ends (normally, by an error or a signal)

The lease is a small JSON object {host, pid, pid_start, started, heartbeat, token} written atomically
through `kesi_dist.storage`, so it works the same on a local disk, NFS and storage URIs. A holder is
live while its heartbeat is younger than the stale limit (`KESI_LEASE_STALE_S`, default 60 s); a
holder on this host whose process is gone is stale at once, so `--resume` right after a crash needs no
wait. Taking a lease is best effort against a driver starting at the very same moment: the lease is
written, then read back, and whoever does not find its own token gives way. Object stores have no
compare-and-swap (a conditional PUT is not in pyarrow's filesystem API), so two drivers writing within
the same instant could both read back their own token; a human starting two drivers seconds apart is
what this guards against.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from kesi_dist import storage
from kesi_dist.errors import UsageError

__all__ = ["Lease", "LEASE", "stale_after", "read_lease", "describe_holder"]

LEASE = "lease.json"
_HELD: set[str] = set()  # tokens of the leases this process holds now


def stale_after() -> float:
    """Seconds without a heartbeat after which a holder counts as gone (`KESI_LEASE_STALE_S`)."""
    return float(os.environ.get("KESI_LEASE_STALE_S", "60"))


def _pid_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process `pid`, None when it is gone (or exited and not
    yet reaped: a zombie) or unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def read_lease(path: str) -> dict | None:
    """The lease at `path`; None when there is none; {} when it is unreadable (taken over)."""
    try:
        data = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and isinstance(data.get("host"), str) and all(
        isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)
        for k in ("pid", "started", "heartbeat"))
    return data if ok else {}


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def describe_holder(held: dict, beat: bool = True) -> str:
    """"pid 4242 on node-7, started 2026-12-07 01:02:03, last heartbeat 4 s ago" (`beat`: the last part)."""
    return (f"pid {held['pid']} on {held['host']}, started {_when(held['started'])}"
            + (f", last heartbeat {max(0.0, time.time() - held['heartbeat']):.0f} s ago" if beat else ""))


def _gone(held: dict) -> str | None:
    """Why the holder is certainly not running any more (its heartbeat aside), or None."""
    if held.get("host") != socket.gethostname():
        return None  # another machine: only its heartbeat can tell
    pid = int(held["pid"])
    if pid == os.getpid():
        return None if held.get("token") in _HELD else "an earlier run in this process that did not release it"
    start = _pid_start(pid)
    if start is None and Path("/proc").is_dir():
        return "that process is gone"
    if start is not None and held.get("pid_start") not in (None, start):
        return "that process is gone (its pid was reused)"
    return None


class Lease:
    """This driver's hold on run folder `root` (see the module docstring)."""

    def __init__(self, path: str, record: dict, interval: float):
        self.path, self.record, self.interval = path, record, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="kesi-lease", daemon=True)

    @classmethod
    def acquire(cls, root: str, *, what: str = "--output") -> "Lease":
        """Hold `root`'s lease (the folder is created when missing).

        Raises:
            UsageError: another driver holds a live lease (the line names its host, pid and start), or
                the folder cannot be created.
        """
        path = storage.join(root, LEASE)
        limit = stale_after()
        held = read_lease(path)
        if held:
            age = time.time() - held["heartbeat"]
            gone = _gone(held)
            if gone is None and age < limit:
                raise UsageError(
                    f"{what} {root}: another kesi driver is running this run ({describe_holder(held)}; {path}); "
                    f"wait for it to end or stop it (Ctrl-C, SIGTERM), then --resume; a driver that died "
                    f"without ending counts as gone after {limit:.0f} s without a heartbeat")
            why = gone or f"no heartbeat for {age:.0f} s: it was killed or lost its node"
            print(f"warning: {path}: taking over the lease of the driver {describe_holder(held, beat=False)} ({why})",
                  file=sys.stderr)
        elif held == {}:
            print(f"warning: {path}: unreadable lease, taken over", file=sys.stderr)
        now = time.time()
        record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                  "started": now, "heartbeat": now, "token": uuid.uuid4().hex}
        try:
            storage.makedirs(root)
        except OSError as e:
            raise UsageError(f"{what} {root}: cannot create the folder ({e.strerror or e}); choose a writable "
                             "path") from None
        storage.write_text(path, json.dumps(record))
        back = read_lease(path)
        if not back or back.get("token") != record["token"]:  # another driver wrote in between
            raise UsageError(f"{what} {root}: another kesi driver took this run at the same moment"
                             + (f" ({describe_holder(back)})" if back else "") + "; let it run or stop it first")
        lease = cls(path, record, interval=max(0.05, min(10.0, limit / 4)))
        _HELD.add(record["token"])
        lease._thread.start()
        return lease

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                held = read_lease(self.path)
                if held is not None and held.get("token") != self.record["token"]:
                    print(f"warning: {self.path}: another driver took over this run's lease"
                          + (f" ({describe_holder(held)})" if held else "") + "; this driver no longer holds it",
                          file=sys.stderr)
                    return
                self.record["heartbeat"] = time.time()
                storage.write_text(self.path, json.dumps(self.record))
            except Exception:  # noqa: BLE001 - a missed beat (storage hiccup) is retried at the next one
                continue

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this driver's (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        _HELD.discard(self.record["token"])
        try:
            held = read_lease(self.path)
            if held is not None and held.get("token") == self.record["token"]:
                storage.remove(self.path)
        except Exception:  # noqa: BLE001 - an unreachable store: the lease goes stale by itself
            pass
