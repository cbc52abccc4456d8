"""Run one function as a Ray task where its resources are (a GPU node for a GPU request), and wait.

For short stage work that should not run in the driver, e.g. measuring the teacher ensemble: the
driver (the head node under `ray job submit`) may have no GPU, and its CPUs are not reserved.
"""

from __future__ import annotations

from typing import Any, Callable

from kesi_dist.errors import KesiError, RunError

__all__ = ["run_remote"]


def run_remote(fn: Callable[..., Any], *args: Any, num_cpus: float = 1, num_gpus: float = 0, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a Ray task holding num_cpus/num_gpus; its result, or its KesiError."""
    import ray
    from ray.exceptions import RayError

    if not ray.is_initialized():
        raise RunError("Ray is not initialised (kesi_dist.runtime.connect_ray first)")
    task = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, KesiError):
            raise cause from None
        raise
