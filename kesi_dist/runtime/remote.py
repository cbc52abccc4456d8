"""Run one function as a Ray task where its resources are (a GPU node for a GPU request), and wait.

For short stage work that should not run in the driver, e.g. measuring the teacher ensemble: the
driver (the head node under `ray job submit`) may have no GPU, and its CPUs are not reserved. With
`on_event`, the function gets an `events` queue (on the driver's node) and what it puts there is handed
to `on_event` in the caller's thread while it runs (progress); training runs report their epochs so too.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from kesi_dist.errors import KesiError, RunError

__all__ = ["run_remote", "driver_queue", "pump"]


def driver_queue():
    """A Ray queue on this (the driver's) node, like Ray Train's controller: losing a worker node must
    not take the epoch events with it."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def pump(events, work: Callable[[], Any], handle: Callable[[dict], None], name: str) -> Any:
    """Run `work()` in a thread while every event from `events` is handled here, in the caller's thread
    (TensorBoard, progress, Tune reports); returns work's result or re-raises its error."""
    import ray
    from ray.util.queue import Empty

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as e:  # re-raised in the calling thread
            box["error"] = e

    thread = threading.Thread(target=run, name=f"fit-{name}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                handle(events.get(timeout=0.5))
            except Empty:
                if not thread.is_alive():
                    break
        while not events.empty():  # anything that arrived after the work returned
            handle(events.get_nowait())
    except KeyboardInterrupt:  # a signal to the driver (kesi_dist.launch): it stops Ray, no waiting for the work
        raise
    except BaseException:
        thread.join()
        ray.kill(events.actor)
        raise
    thread.join()
    ray.kill(events.actor)
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_remote(fn: Callable[..., Any], *args: Any, num_cpus: float = 1, num_gpus: float = 0,
               on_event: Callable[[Any], None] | None = None, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a Ray task holding num_cpus/num_gpus; its result, or its KesiError.
    With `on_event`, `fn` is also passed `events=<queue>` and every item it puts there goes to `on_event`."""
    import ray
    from ray.exceptions import RayError

    if not ray.is_initialized():
        raise RunError("Ray is not initialised (kesi_dist.runtime.connect_ray first)")
    task = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus)
    try:
        if on_event is None:
            return ray.get(task.remote(*args, **kwargs))
        events = driver_queue()
        ref = task.remote(*args, events=events, **kwargs)
        return pump(events, lambda: ray.get(ref), on_event, getattr(fn, "__name__", "task"))
    except RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, KesiError):
            raise cause from None
        raise
