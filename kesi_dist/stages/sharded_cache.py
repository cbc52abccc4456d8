"""A keyed, sharded cache computed by a pool of Ray actors: what the soft-label and memory-bank stages share.

    found = reuse_or_clear(out, key, FORMAT, KINDS, "*-e*-s*-*.npy")   # a complete cache with this key, or
                                                                      # the folder made ready (no meta.json)
    shards, actors = compute_shards(out, units, Worker, kinds=KINDS, stem=..., entry=..., ...)
    write_meta(out, {...})                                            # last: its presence means complete

Each actor (`kesi_dist.runtime.map_units`) holds what the worker class loads once (teachers, a loader in
sample order); the next work unit goes to whichever actor is free, and the driver writes one shard per
unit as it arrives (`kesi_dist.distill.shards` has the files and their checks), so actors may live on any
node that can read the data.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, Callable

from kesi_dist import storage
from kesi_dist.distill.shards import complete_meta, save_npy
from kesi_dist.runtime import map_units

__all__ = ["reuse_or_clear", "compute_shards", "write_meta"]


def reuse_or_clear(out: str, key: str, fmt: str, kinds: tuple[str, ...], stale: str) -> dict | None:
    """The meta of a complete, intact cache with `key` in `out` (plus "reused": True), else None with the
    folder created, its meta.json removed (from here on it does not look complete) and its shard files
    matching `stale` deleted."""
    found = complete_meta(out, key, fmt, kinds)
    if found is not None:
        return {**found, "reused": True}
    storage.makedirs(out)
    storage.remove(storage.join(out, "meta.json"))
    for old in fnmatch.filter(storage.listdir(out), stale):
        storage.remove(storage.join(out, old))
    return None


def compute_shards(out: str, units: list[tuple], factory: type, *, kinds: tuple[str, ...],
                   stem: Callable[[dict], str], entry: Callable[[dict, dict, dict], dict], num_actors: int,
                   args: tuple, kwargs: dict, num_cpus: float, num_gpus: float, what: str,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Run `factory(*args, **kwargs).compute(*unit)` for every unit on up to `num_actors` actors and write
    each result's arrays `kinds` as `<out>/<stem(result)>-<kind>.npy` as it arrives; returns (one
    `entry(result, actor, files)` per unit, in arrival order; the actors that computed something).
    `progress(units written, units)` is called as the pass goes."""
    shards: list[dict] = []

    def write(unit: tuple, r: dict, actor: dict) -> None:  # as each unit arrives, while actors go on
        files = {kind: save_npy(storage.join(out, f"{stem(r)}-{kind}.npy"), r[kind]) for kind in kinds}
        shards.append(entry(r, actor, files))
        if progress is not None:
            progress(len(shards), len(units))

    actors = map_units(factory, units, on_result=write, num_actors=num_actors, args=args, kwargs=kwargs,
                       num_cpus=num_cpus, num_gpus=num_gpus, what=what)
    return shards, actors


def write_meta(out: str, meta: dict[str, Any]) -> dict:
    """Write `<out>/meta.json` (last, atomically: the cache is complete from here on); returns the meta
    with "reused": False."""
    storage.write_text(storage.join(out, "meta.json"), json.dumps(meta, indent=1) + "\n")
    return {**meta, "reused": False}
