"""The soft-label stage: the teachers' top-k soft labels for every (epoch, image) the student will see.

A pool of Ray actors each holds the whole ensemble and a train loader in sample order; every epoch is
cut into work units of consecutive batches and the next unit goes to whichever actor is free (a slow or
busy node does less, not the same share late), and an actor's loader reads only its unit's samples.
The driver writes one shard per unit as it arrives (`kesi_dist.stages.sharded_cache`, the pass the
memory bank shares; `kesi_dist.distill.soft_label_cache` has the format). The pool works with the actors
it can get: an actor lost with its node gives its unit back and is replaced.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from kesi_dist import storage
from kesi_dist.data.holdout import describe_holdout
from kesi_dist.distill.shards import check_teachers, file_sha256, load_npy, verified, work_units
from kesi_dist.distill.soft_label_cache import FORMAT, KINDS, VALUE_DTYPES, SoftLabelWorker, cache_key
from kesi_dist.errors import UsageError
from kesi_dist.progress import bar
from kesi_dist.runs import RunContext
from kesi_dist.stages.sharded_cache import compute_shards, reuse_or_clear, write_meta
from kesi_dist.train.spec import EngineSpec, LoaderSpec

__all__ = ["soft_labels_stage", "build_soft_label_cache"]



def soft_labels_stage(ctx: RunContext, teachers: list[str], *, loader: LoaderSpec, engine: EngineSpec, seed: int,
                      epochs: int, temperature: float, topk: int, actors: int) -> str:
    """Build (or reuse) the cache of the snapshots `teachers` in `<run>/soft_labels`; returns that folder."""
    out = ctx.run.path("soft_labels")
    with ctx.stage("soft_labels") as st:
        if st.done:
            return out
        ctx.print(f"[bold]soft_labels[/]: {len(teachers)} teachers x {epochs} epochs on {actors} actor(s), "
                  f"top-{topk}")
        with bar(ctx.console, "soft labels", None, unit="unit") as b:
            meta = build_soft_label_cache(
                [ctx.snapshot(n) for n in teachers], loader.data_dir, out, epochs=epochs, seed=seed,
                batch_size=loader.batch_size, resolution=loader.resolution, augment=loader.augment,
                temperature=temperature, topk=topk, num_actors=actors, backend=loader.backend,
                cpus_per_actor=engine.cpus_per_worker, gpus_per_actor=engine.gpus_per_worker,
                progress=lambda done, total: b.update(completed=done, total=total), **loader.split_args)
        st.update(reused=bool(meta.get("reused")), actors=actors)
    return out


def build_soft_label_cache(
    teacher_paths: list[str],
    data_dir: str,
    out_dir: str,
    *,
    epochs: int,
    seed: int,
    batch_size: int,
    resolution: int,
    augment: str,
    temperature: float,
    topk: int,
    num_actors: int,
    backend: str = "ffcv",
    cpus_per_actor: float = 1,
    gpus_per_actor: float = 0,
    loader_workers: int = 1,
    values_dtype: str = "float32",
    holdout: float = 0,
    holdout_seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Compute (or reuse) the soft labels of `epochs` epochs of the train split on a pool of Ray actors.

    Ray must already be initialised. Each actor loads the whole ensemble and runs it on the work
    units (runs of consecutive batches) handed to it while it is free (see the module docstring); torch
    uses int(cpus_per_actor) threads in each actor; the loader uses `loader_workers` FFCV threads (at least 1) or, with backend
    "torch", DataLoader processes (0 = in the actor itself).

    Args:
        teacher_paths: teacher checkpoints (kesi_dist format).
        data_dir: the prepared dataset (the student's).
        out_dir: where the cache lives (created); a complete cache with the same key is reused.
        epochs: the student's epochs 0..epochs-1 are covered.
        seed, resolution, augment: the student's loader settings (they define the augmentation).
        batch_size: batch of the teacher pass (does not change the labels: teachers are in eval mode).
        temperature: T of the softened probabilities.
        topk: probabilities kept per sample (>= num_classes keeps the full distribution).
        num_actors: actors in the pool (at most one per batch of the pass).
        values_dtype: "float32" (exact) or "float16" (half the space, ~1e-3 relative error).
        holdout, holdout_seed: the student's held-out split (`kesi_dist.data.holdout`): those images are
            never trained on, so the pass leaves them out.
        progress: called with (units written, units) as the pass goes.

    Returns:
        The cache's meta: key, settings, "actors" (actor index, actor_id, pid, node_id), "shards" (one per
        work unit: epoch, shard, the actor that computed it, batches, count, files with bytes and sha256, compute_s, and the
        wall and CPU seconds spent in the teachers: teacher_s, teacher_cpu_s),
        "timings" (actors_start_s, pass_s, total_s) and "reused" (True when nothing was computed).

    Raises:
        UsageError: bad arguments. RunError: unreadable teachers or data, a failed actor.
    """
    start = time.perf_counter()
    if not teacher_paths:
        raise UsageError("build_soft_label_cache: no teacher checkpoints given")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("topk", topk), ("num_actors", num_actors)):
        if value < 1:
            raise UsageError(f"soft-label cache: {name} {value} must be >= 1")
    if loader_workers < 0:
        raise UsageError(f"soft-label cache: loader_workers {loader_workers} must be >= 0")
    if temperature <= 0:
        raise UsageError(f"soft-label cache: temperature {temperature} must be > 0")
    if values_dtype not in VALUE_DTYPES:
        raise UsageError(f"soft-label cache: values_dtype {values_dtype!r} must be one of {', '.join(VALUE_DTYPES)}")
    if cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise UsageError(f"soft-label cache: cpus_per_actor {cpus_per_actor} must be > 0, gpus_per_actor >= 0")
    data_fp, data_meta = check_teachers(teacher_paths, data_dir)
    settings = {"seed": int(seed), "epochs": int(epochs), "resolution": int(resolution), "augment": augment,
                "temperature": float(temperature), "topk": int(topk), "values_dtype": values_dtype}
    teacher_hashes = [file_sha256(p) for p in teacher_paths]
    train_size = int(data_meta["train_size"])
    held = None
    if holdout:  # the student never trains on these: the pass leaves them out
        held = describe_holdout(storage.absolute(data_dir), holdout, holdout_seed, with_indices=True)
        train_size = held["train_size"]
    key = cache_key(teacher_hashes=teacher_hashes, data_fingerprint=data_fp, **settings,
                    holdout=held["sha256"] if held else None)
    out = out_dir if storage.is_uri(out_dir) else str(out_dir)
    found = reuse_or_clear(out, key, FORMAT, KINDS, "*-e*-s*-*.npy")
    if found is not None:
        return found

    n_batches = math.ceil(train_size / batch_size)
    used = min(num_actors, n_batches * epochs)  # an actor with no batch would only cost a process

    def entry(r: dict, actor: dict, files: dict) -> dict:
        return {"epoch": r["epoch"], "shard": r["shard"], "actor": actor["actor"], "actor_id": actor["actor_id"],
                "pid": actor["pid"], "node_id": actor["node_id"], "batches": r["batches"],
                "count": int(len(r["samples"])), "files": files, "compute_s": round(r["compute_s"], 4),
                "teacher_s": round(r["teacher_s"], 4), "teacher_cpu_s": round(r["teacher_cpu_s"], 4)}

    worker_kwargs = dict(batch_size=batch_size, resolution=resolution, augment=augment, seed=seed,
                         temperature=temperature, topk=topk, backend=backend, loader_workers=loader_workers,
                         threads=max(1, int(cpus_per_actor)), gpus=gpus_per_actor,
                         values_dtype=values_dtype, expected_batches=n_batches, holdout=holdout,
                         holdout_seed=holdout_seed)
    pool_start = time.perf_counter()
    shards, actors = compute_shards(
        out, work_units(n_batches, epochs, used), SoftLabelWorker, kinds=KINDS,
        stem=lambda r: f"{key[:12]}-e{r['epoch']:04d}-s{r['shard']:03d}", entry=entry, num_actors=used,
        args=([storage.absolute(p) for p in teacher_paths], storage.absolute(data_dir)), kwargs=worker_kwargs,
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, what="soft_labels", progress=progress)
    first_up = min(a["up_s"] for a in actors)
    pass_s = time.perf_counter() - pool_start - first_up
    shards.sort(key=lambda s: (s["epoch"], s["shard"]))
    first = shards[0]["files"]["values"]
    k = int(load_npy(*verified(out, first)).shape[1])
    meta = {
        "format": FORMAT, "key": key, **settings, "topk_stored": k, "batch_size": int(batch_size),
        "num_classes": int(data_meta["num_classes"]), "train_size": int(data_meta["train_size"]),
        "data_dir": storage.absolute(data_dir), "data_fingerprint": data_fp, "samples_per_epoch": train_size, "holdout": held,
        "teachers": [{"path": str(p), "sha256": h} for p, h in zip(teacher_paths, teacher_hashes)],
        "num_actors": used, "batches_per_epoch": n_batches,
        "actors": actors,
        "shards": shards,
        "timings": {"actors_start_s": round(pool_start - start + first_up, 4), "pass_s": round(pass_s, 4),
                    "total_s": round(time.perf_counter() - start, 4)},
        "created": time.time(),
    }
    return write_meta(out, meta)
