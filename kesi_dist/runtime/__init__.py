"""Where work runs: the only package that imports Ray.

    trainer       run_training: one model on a Ray Train worker group (or in-process)
    worker        what each training worker does (setup, resume, epoch, save)
    sessions      how a worker reports: Ray Train, or the in-process local session
    branches      parallel training branches as Ray Tune trials (method-neutral)
    actor_pool    work units over a pool of Ray actors (kept between calls, or for one batch), next unit
                  to whichever is free
    remote        one function as a Ray task with its resources
    cluster       connecting to Ray, and the checks made before a run writes anything
"""

import importlib

# Lazy, so that importing one helper does not import Ray Tune (seconds) for commands that never use it.
_WHERE = {"map_units": "actor_pool", "ActorPool": "actor_pool", "Branch": "branches", "run_branches": "branches", "ASHA_METRIC": "branches",
          "connect_ray": "cluster", "disconnect_ray": "cluster", "check_resources": "cluster", "check_gpus": "cluster", "check_shared_path": "cluster",
          "token_source": "cluster", "run_remote": "remote", "TrainResult": "trainer", "run_training": "trainer",
          "InjectedFailure": "worker"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'kesi_dist.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kesi_dist.runtime.{_WHERE[name]}"), name)
