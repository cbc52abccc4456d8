"""Map work units over a pool of Ray actors: the next unit goes to whichever actor is free.

Used by the soft-label pass (and meant for EKG's candidate scoring and SWP's search): each actor is
built once from a plain class (`factory(*args, **kwargs)`, e.g. the teachers and a loader, paid once),
then `getattr(actor, method)(*unit)` runs for one unit after another. Results come back to the caller's
thread through `on_result`, in completion order, so the caller writes them as they arrive.

The pool works with the actors it can get: it starts as soon as one actor is up, and an actor whose
node dies (or whose process is killed) gives its unit back to the queue and is replaced, up to
`max_restarts` times (a replacement may land on a node Ray has not yet noticed is dead, and die too;
once the budget is spent the pool goes on with the actors it has). If no actor is up for
`start_timeout_s` (the cluster has no room for even one, or lost the nodes that had), it stops with
one line saying what it asked for. An error raised by the
actor's own code (bad data, a `KesiError`) is not a lost node: it stops the pool with its message.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from typing import Any, Callable, Sequence

from kesi_dist.errors import KesiError, RunError

__all__ = ["map_units"]


class _Host:
    """The Ray actor: holds one `factory(...)` object and calls its methods."""

    def __init__(self, factory: type, args: tuple, kwargs: dict):
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
    """Run `method(*unit)` for every unit on up to `num_actors` actors built as `factory(*args, **kwargs)`.

    Args:
        units: the work, each a tuple of arguments; every unit runs exactly once to completion.
        on_result: `on_result(unit, result, actor_info)`, called here as each unit finishes.
        num_cpus, num_gpus: what each actor holds.
        what: how errors name the pool (e.g. "soft_labels").
        start_timeout_s: how long the pool may have no live actor before it gives up.
        max_restarts: replacements started for lost actors, in all (default: 4 x num_actors).

    Returns:
        One info dict per actor that computed something: actor (index), up_s (seconds from the pool's
        start until it was up), actor_id, pid, node_id, host, plus the object's own `info()` if any.

    Raises:
        RunError: no actor was up for `start_timeout_s`, or every actor was lost with no replacement left.
        KesiError: raised by the actor code itself (re-raised as is).
    """
    import ray
    from ray.exceptions import RayActorError, RayError

    if not ray.is_initialized():
        raise RunError(f"{what}: Ray is not initialised (kesi_dist.runtime.connect_ray first)")
    if not units:
        return []
    Host = ray.remote(_Host).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)
    todo = collections.deque(units)
    restarts_left = 4 * num_actors if max_restarts is None else max_restarts
    actors: dict[int, Any] = {}  # index -> handle, starting or live
    infos: dict[int, dict] = {}  # index -> info, every actor that came up
    live: set[int] = set()
    pending: dict[Any, tuple[int, tuple | None]] = {}  # ref -> (actor index, unit; None = its start)
    used: set[int] = set()
    next_index = lost = 0

    def start_actor() -> None:
        nonlocal next_index
        handle = Host.remote(factory, args, kwargs or {})
        actors[next_index] = handle
        pending[handle.info.remote()] = (next_index, None)
        next_index += 1

    def give_work(i: int) -> None:
        if todo:
            unit = todo.popleft()
            pending[actors[i].call.remote(method, unit)] = (i, unit)

    for _ in range(min(num_actors, len(units))):
        start_actor()
    began = idle_since = time.monotonic()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            if not ready:
                if not live and time.monotonic() - idle_since > start_timeout_s:
                    raise RunError(
                        f"{what}: no actor could start within {start_timeout_s:.0f} s (each asks for "
                        f"{num_cpus:g} CPU, {num_gpus:g} GPU); the cluster has no room for one: free or add "
                        "nodes, or lower the resources per actor")
                continue
            i, unit = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as e:
                if getattr(e, "actor_init_failed", False):  # its constructor raised: the same on any node
                    raise RunError(f"{what}: an actor failed to start: {_last_line(e)}") from None
                # Its node died or its process was killed: not the unit's fault, so the unit goes back.
                lost += 1
                live.discard(i)
                ray.kill(actors.pop(i), no_restart=True)
                if unit is not None:
                    todo.appendleft(unit)
                if not live:
                    idle_since = time.monotonic()
                if restarts_left > 0:
                    restarts_left -= 1
                    start_actor()
                elif not live and not pending:  # nobody left to do the work, and no more replacements
                    raise RunError(f"{what}: lost {lost} actor(s), every replacement allowed included; the last: "
                                   f"{str(e).strip().splitlines()[0][:200]}") from None
                continue
            except RayError as e:
                raise _cause(e) from None
            if unit is None:  # an actor is up
                infos[i] = {"actor": i, "up_s": round(time.monotonic() - began, 4), **result}
                live.add(i)
            else:
                used.add(i)
                on_result(unit, result, infos[i])
            give_work(i)
            if not todo and all(u is None for _, u in pending.values()):
                break  # every unit is done or in flight... and none in flight: finished
    finally:
        for handle in actors.values():
            ray.kill(handle)
    return [infos[i] for i in sorted(used)]
