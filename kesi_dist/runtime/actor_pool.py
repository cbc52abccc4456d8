"""Work units over a pool of Ray actors: the next unit goes to whichever actor is free.

Each actor is built once from a plain class (`factory(*args, **kwargs)`: the teachers and a loader, a
model and its holdout tensors, paid once), then `getattr(obj, method)(*unit)` runs for one unit after
another. `ActorPool` keeps its actors between calls of `map` (EKG's search sends one batch of
candidate evaluations per step to the same actors); `map_units` is a pool for one batch of units (the
soft-label pass). Results come back to the caller's thread through `on_result`, in completion order,
so the caller can write them as they arrive.

The pool works with the actors it can get: it starts as soon as one actor is up, and an actor whose
node dies (or whose process is killed) gives its unit back to the queue and is replaced, up to
`max_restarts` times (a replacement may land on a node Ray has not yet noticed is dead, and die too;
once the budget is spent the pool goes on with the actors it has). If no actor is up for
`start_timeout_s` (the cluster has no room for even one, or lost the nodes that had), it stops with
one line saying what it asked for. An error raised by the actor's own code (bad data, a `KesiError`)
is not a lost node: it stops the pool with its message.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from typing import Any, Callable, Sequence

from kesi_dist.errors import KesiError, RunError

__all__ = ["ActorPool", "map_units"]


class _Host:
    """The Ray actor: holds one `factory(...)` object and calls its methods."""

    def __init__(self, factory: type, payload: tuple):
        args, kwargs = payload
        self.obj = factory(*args, **kwargs)

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        own = self.obj.info() if hasattr(self.obj, "info") else {}
        return {"actor_id": ctx.get_actor_id(), "pid": os.getpid(), "node_id": ctx.get_node_id(),
                "host": socket.gethostname(), **own}

    def call(self, method: str, unit: tuple) -> Any:
        return getattr(self.obj, method)(*unit)


def _cause(err: BaseException) -> BaseException:
    """The actor code's own exception when it is a user-facing one (Ray wraps it)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, KesiError) else err


def _last_line(err: BaseException) -> str:
    """The raised exception's own message from Ray's text (its last line, without the class name)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    last = lines[-1] if lines else type(err).__name__
    head, sep, rest = last.partition(": ")
    return rest if sep and head.replace(".", "").replace("_", "").isalnum() else last


class ActorPool:
    """Up to `num_actors` actors built as `factory(*args, **kwargs)`, kept until `close()` (or the end of
    a `with` block). The arguments are put in Ray's object store once, whatever the number of actors.

    Args:
        num_cpus, num_gpus: what each actor holds.
        what: how errors name the pool (e.g. "soft_labels", "ekg search").
        start_timeout_s: how long the pool may have no live actor before it gives up.
        max_restarts: replacements started for lost actors, in all (default: 4 x num_actors).
    """

    def __init__(self, factory: type, *, num_actors: int, args: tuple = (), kwargs: dict | None = None,
                 num_cpus: float = 1, num_gpus: float = 0, what: str = "actor pool", start_timeout_s: float = 300,
                 max_restarts: int | None = None):
        import ray

        if not ray.is_initialized():
            raise RunError(f"{what}: Ray is not initialised (kesi_dist.runtime.connect_ray first)")
        if num_actors < 1:
            raise RunError(f"{what}: needs at least one actor, got {num_actors}")
        self.factory, self.what = factory, what
        self.num_cpus, self.num_gpus, self.start_timeout_s = num_cpus, num_gpus, start_timeout_s
        self._Host = ray.remote(_Host).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
        self._payload = ray.put((tuple(args), dict(kwargs or {})))
        self._restarts_left = 4 * num_actors if max_restarts is None else max_restarts
        self._actors: dict[int, Any] = {}  # index -> handle, starting or live
        self._infos: dict[int, dict] = {}  # index -> info, every actor that came up
        self._live: set[int] = set()
        self._starting: dict[Any, int] = {}  # info ref -> index of an actor not yet up
        self._next = self.lost = 0
        self._began = time.monotonic()
        for _ in range(num_actors):
            self._start()

    def _start(self) -> None:
        handle = self._Host.remote(self.factory, self._payload)
        self._actors[self._next] = handle
        self._starting[handle.info.remote()] = self._next
        self._next += 1

    @property
    def infos(self) -> list[dict]:
        """Info of every actor that came up so far: actor (index), up_s (seconds from the pool's start),
        actor_id, pid, node_id, host, plus the object's own `info()` if any."""
        return [self._infos[i] for i in sorted(self._infos)]

    def wait(self, count: int, timeout_s: float = 300) -> int:
        """Block until `count` actors are up (or `timeout_s` passed); returns how many are up. The pool
        never needs this (it works with the actors it has); a caller that wants the work spread does."""
        import ray

        deadline = time.monotonic() + timeout_s
        while len(self._live) < count and self._starting and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self._starting), num_returns=1, timeout=1.0)
            for ref in ready:
                i = self._starting.pop(ref)
                self._infos[i] = {"actor": i, "up_s": round(time.monotonic() - self._began, 4), **ray.get(ref)}
                self._live.add(i)
        return len(self._live)

    def map(self, units: Sequence[tuple], *, on_result: Callable[[tuple, Any, dict], None] | None = None,
            method: str = "compute") -> list[Any]:
        """Run `method(*unit)` for every unit, each exactly once to completion; returns the results in
        the order of `units`. `on_result(unit, result, actor_info)` is called here as each one finishes.

        Raises:
            RunError: no actor was up for `start_timeout_s`, or every actor was lost with no replacement left.
            KesiError: raised by the actor code itself (re-raised as is).
        """
        import ray
        from ray.exceptions import RayActorError, RayError

        todo = collections.deque(enumerate(units))
        results: dict[int, Any] = {}
        running: dict[Any, tuple[int, tuple[int, tuple]]] = {}  # ref -> (actor index, (position, unit))
        busy: set[int] = set()
        idle_since = time.monotonic()

        def give_work(i: int) -> None:
            if todo and i in self._live and i not in busy:
                item = todo.popleft()
                running[self._actors[i].call.remote(method, item[1])] = (i, item)
                busy.add(i)

        for i in sorted(self._live):
            give_work(i)
        while todo or running:
            refs = list(running) + list(self._starting)
            ready, _ = ray.wait(refs, num_returns=1, timeout=5.0)
            if not ready:
                if not self._live and time.monotonic() - idle_since > self.start_timeout_s:
                    raise RunError(
                        f"{self.what}: no actor could start within {self.start_timeout_s:.0f} s (each asks for "
                        f"{self.num_cpus:g} CPU, {self.num_gpus:g} GPU); the cluster has no room for one: free or "
                        "add nodes, or lower the resources per actor")
                continue
            ref = ready[0]
            if ref in self._starting:
                i, item = self._starting.pop(ref), None
            else:
                i, item = running.pop(ref)
                busy.discard(i)
            try:
                result = ray.get(ref)
            except RayActorError as e:
                if getattr(e, "actor_init_failed", False):  # its constructor raised: the same on any node
                    raise RunError(f"{self.what}: an actor failed to start: {_last_line(e)}") from None
                # Its node died or its process was killed: not the unit's fault, so the unit goes back.
                self.lost += 1
                self._live.discard(i)
                ray.kill(self._actors.pop(i), no_restart=True)
                if item is not None:
                    todo.appendleft(item)
                if not self._live:
                    idle_since = time.monotonic()
                if self._restarts_left > 0:
                    self._restarts_left -= 1
                    self._start()
                elif not self._live and not self._starting:  # nobody left, and no more replacements
                    raise RunError(f"{self.what}: lost {self.lost} actor(s), every replacement allowed included; "
                                   f"the last: {str(e).strip().splitlines()[0][:200]}") from None
                continue
            except RayError as e:
                raise _cause(e) from None
            if item is None:  # an actor is up
                self._infos[i] = {"actor": i, "up_s": round(time.monotonic() - self._began, 4), **result}
                self._live.add(i)
            else:
                results[item[0]] = result
                if on_result is not None:
                    on_result(item[1], result, self._infos[i])
            give_work(i)
        return [results[k] for k in range(len(units))]

    def close(self) -> None:
        import ray

        for handle in self._actors.values():
            ray.kill(handle)
        self._actors.clear()
        self._live.clear()
        self._starting.clear()

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_units(
    factory: type,
    units: Sequence[tuple],
    *,
    on_result: Callable[[tuple, Any, dict], None],
    num_actors: int,
    args: tuple = (),
    kwargs: dict | None = None,
    method: str = "compute",
    num_cpus: float = 1,
    num_gpus: float = 0,
    what: str = "actor pool",
    start_timeout_s: float = 300,
    max_restarts: int | None = None,
) -> list[dict]:
    """Run `method(*unit)` for every unit on a pool of up to `num_actors` actors (at most one per unit),
    closed afterwards; see `ActorPool` for the arguments and errors.

    Returns:
        One info dict per actor that computed something (`ActorPool.infos`' fields).
    """
    import ray

    if not ray.is_initialized():
        raise RunError(f"{what}: Ray is not initialised (kesi_dist.runtime.connect_ray first)")
    if not units:
        return []
    used: dict[int, dict] = {}

    def seen(unit: tuple, result: Any, actor: dict) -> None:
        used[actor["actor"]] = actor
        on_result(unit, result, actor)

    with ActorPool(factory, num_actors=min(num_actors, len(units)), args=args, kwargs=kwargs, num_cpus=num_cpus,
                   num_gpus=num_gpus, what=what, start_timeout_s=start_timeout_s, max_restarts=max_restarts) as pool:
        pool.map(units, on_result=seen, method=method)
    return [used[i] for i in sorted(used)]
