"""`kesi_dist.runtime.map_units` on the session's local Ray (2 CPUs): every unit once, to free actors;
an actor whose process dies gives its unit back; no room for any actor or a failing constructor is
one line, not a hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from kesi_dist.errors import RunError, UsageError
from kesi_dist.runtime import map_units


class Squarer:
    """A pool worker: squares numbers; optionally kills its own process at one unit, once (marker file),
    or holds its first unit until `parties` actors are up (a barrier of files), so that a fast-starting
    actor cannot finish every unit before the other one exists."""

    def __init__(self, die_at: int | None = None, marker: str | None = None, fail_init: bool = False,
                 barrier: str | None = None, parties: int = 2):
        if fail_init:
            raise RunError("/data/x: the loader yields 3 batches per epoch, expected 4")
        self.die_at, self.marker = die_at, marker
        self.barrier, self.parties = barrier, parties
        if barrier:
            Path(barrier, f"up-{os.getpid()}").touch()

    def info(self) -> dict:
        return {"kind": "squarer"}

    def compute(self, x: int) -> dict:
        deadline = time.monotonic() + 60
        while self.barrier and len(list(Path(self.barrier).glob("up-*"))) < self.parties:
            assert time.monotonic() < deadline, "the other actor never came up"
            time.sleep(0.05)
        if x == self.die_at and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        if x < 0:
            raise UsageError(f"negative unit {x}")
        time.sleep(0.05)
        return {"x": x, "y": x * x, "pid": os.getpid()}


def test_every_unit_once_on_free_actors(ray_local, tmp_path):
    got = []
    infos = map_units(Squarer, [(i,) for i in range(12)], num_actors=2, num_cpus=1, kwargs={"barrier": str(tmp_path)},
                      on_result=lambda unit, r, actor: got.append((unit[0], r["y"], actor["actor"])))
    assert sorted(x for x, _, _ in got) == list(range(12)) and all(y == x * x for x, y, _ in got)
    assert {a for _, _, a in got} == {0, 1} and len(infos) == 2  # both actors worked
    assert all(i["kind"] == "squarer" and i["node_id"] and i["up_s"] >= 0 for i in infos)


def test_a_killed_actor_gives_its_unit_back(ray_local, tmp_path):
    marker = tmp_path / "died"
    got = []
    map_units(Squarer, [(i,) for i in range(8)], num_actors=2, num_cpus=1, kwargs={"die_at": 3, "marker": str(marker)},
              on_result=lambda unit, r, actor: got.append((r["x"], r["pid"])))
    died = int(marker.read_text())  # an actor process really died mid-unit
    assert sorted(x for x, _ in got) == list(range(8))  # every unit once: unit 3 ran again, nothing twice
    assert dict(got)[3] != died


def test_no_room_for_any_actor_is_one_line_after_the_wait(ray_local):
    started = time.monotonic()
    with pytest.raises(RunError, match=r"pool: no actor could start within 3 s \(each asks for 64 CPU"):
        map_units(Squarer, [(1,)], num_actors=2, num_cpus=64, start_timeout_s=3, what="pool",
                  on_result=lambda *a: None)
    assert time.monotonic() - started < 60


def test_constructor_and_unit_errors_stop_the_pool_with_their_message(ray_local):
    with pytest.raises(RunError, match=r"^pool: an actor failed to start: /data/x: the loader yields 3 batches"):
        map_units(Squarer, [(1,)], num_actors=1, kwargs={"fail_init": True}, what="pool", on_result=lambda *a: None)
    with pytest.raises(UsageError, match="negative unit -1"):
        map_units(Squarer, [(2,), (-1,)], num_actors=1, on_result=lambda *a: None)


def test_a_pool_keeps_its_actors_between_calls(ray_local):
    from kesi_dist.runtime import ActorPool

    with ActorPool(Squarer, num_actors=2, num_cpus=1, what="pool") as pool:
        assert pool.wait(2, timeout_s=120) == 2
        first = pool.map([(i,) for i in range(6)])
        second = pool.map([(i,) for i in range(6, 10)])
        assert [r["y"] for r in first + second] == [i * i for i in range(10)]  # in the order of the units
        pids = {r["pid"] for r in first} | {r["pid"] for r in second}
        assert pids == {i["pid"] for i in pool.infos} and len(pids) == 2  # the same two processes throughout
