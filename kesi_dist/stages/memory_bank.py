"""The memory-bank stage: J teachers' logits on every clean training image, computed once on an actor pool.

Each actor holds the teachers and a clean train loader in sample order; the pass is cut into work units
of consecutive batches, the next unit goes to whichever actor is free, and the driver writes one shard
per unit as it arrives (`kesi_dist.stages.sharded_cache`, the pass the soft labels share;
`kesi_dist.distill.memory_bank_cache` has the format and the reader). The held-out images are left out: no student trains on them. A complete bank with the
same key (teacher files, data, resolution, batch, holdout) is reused as is.
"""

from __future__ import annotations

import time
from typing import Callable

from kesi_dist import storage
from kesi_dist.data.holdout import describe_holdout
from kesi_dist.distill.memory_bank_cache import BANK_FORMAT, BANK_KINDS, MemoryBankWorker, bank_key
from kesi_dist.distill.shards import check_teachers, file_sha256, work_units
from kesi_dist.progress import bar
from kesi_dist.runs import RunContext
from kesi_dist.stages.sharded_cache import compute_shards, reuse_or_clear, write_meta
from kesi_dist.train.spec import EngineSpec, LoaderSpec

__all__ = ["memory_bank_stage", "build_memory_bank"]



def memory_bank_stage(ctx: RunContext, teachers: list[str], *, loader: LoaderSpec, engine: EngineSpec, actors: int,
                      batch_size: int) -> str:
    """Build (or reuse) the bank of the teacher files `teachers` (best first) in `<run>/memory_bank`."""
    out = ctx.run.path("memory_bank")
    with ctx.stage("memory_bank", teachers=len(teachers)) as st:
        if st.done:
            return out
        ctx.print(f"[bold]memory_bank[/]: logits of {len(teachers)} teachers on every clean training image, "
                  f"{actors} actor(s)")
        with bar(ctx.console, "memory bank", None, unit="unit") as b:
            meta = build_memory_bank(teachers, loader.data_dir, out, batch_size=batch_size,
                                     resolution=loader.resolution, backend=loader.backend, num_actors=actors,
                                     cpus_per_actor=engine.cpus_per_worker, gpus_per_actor=engine.gpus_per_worker,
                                     progress=lambda done, total: b.update(completed=done, total=total),
                                     **loader.split_args)
        mb = sum(f["bytes"] for s in meta["shards"] for f in s["files"].values()) / 2 ** 20
        ctx.print(f"  {meta['samples']} images x {meta['num_classes']} classes x {len(teachers)} teachers, "
                  f"{mb:.1f} MiB" + (" (reused)" if meta.get("reused") else f", {meta['timings']['total_s']:.1f} s"))
        st.update(reused=bool(meta.get("reused")), actors=[a["node_id"] for a in meta.get("actors", [])],
                  samples=meta["samples"], timings=meta.get("timings"))
    return out


def build_memory_bank(teacher_paths: list[str], data_dir: str, out_dir: str, *, batch_size: int, resolution: int,
                      backend: str, num_actors: int, cpus_per_actor: float = 1, gpus_per_actor: float = 0,
                      holdout: float = 0, holdout_seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Compute (or reuse) the bank; returns its meta (plus "reused"). Ray must be initialised.
    `progress(units written, units)` is called as the pass goes."""
    start = time.perf_counter()
    data_fp, data_meta = check_teachers(teacher_paths, data_dir)
    held, samples = None, int(data_meta["train_size"])
    if holdout:
        held = describe_holdout(storage.absolute(data_dir), holdout, holdout_seed, with_indices=True)
        samples = held["train_size"]
    hashes = [file_sha256(p) for p in teacher_paths]
    key = bank_key(teacher_hashes=hashes, data_fingerprint=data_fp, resolution=resolution, batch_size=batch_size,
                   holdout=held["sha256"] if held else None)
    found = reuse_or_clear(out_dir, key, BANK_FORMAT, BANK_KINDS, "*-s*-*.npy")
    if found is not None:
        return found
    n_batches = -(-samples // batch_size)

    def entry(r: dict, actor: dict, files: dict) -> dict:
        return {"shard": r["shard"], "batches": r["batches"], "count": len(r["samples"]), "files": files,
                "actor": actor["actor"], "node_id": actor["node_id"], "compute_s": round(r["compute_s"], 4)}

    shards, actors = compute_shards(
        out_dir, [(u, a, b) for _, u, a, b in work_units(n_batches, 1, num_actors)], MemoryBankWorker,
        kinds=BANK_KINDS, stem=lambda r: f"{key[:12]}-s{r['shard']:03d}", entry=entry, num_actors=num_actors,
        args=([storage.absolute(p) for p in teacher_paths], storage.absolute(data_dir)),
        kwargs=dict(batch_size=batch_size, resolution=resolution, backend=backend, loader_workers=1,
                    threads=max(1, int(cpus_per_actor)), gpus=gpus_per_actor, holdout=holdout, holdout_seed=holdout_seed),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, what="memory_bank", progress=progress)
    shards.sort(key=lambda s: s["shard"])
    meta = {"format": BANK_FORMAT, "key": key, "num_classes": int(data_meta["num_classes"]),
            "train_size": int(data_meta["train_size"]), "samples": samples, "resolution": int(resolution),
            "batch_size": int(batch_size), "holdout": held, "data_dir": storage.absolute(data_dir), "data_fingerprint": data_fp,
            "teachers": [{"path": str(p), "sha256": h} for p, h in zip(teacher_paths, hashes)],
            "actors": actors, "shards": shards, "timings": {"total_s": round(time.perf_counter() - start, 3)},
            "created": time.time()}
    return write_meta(out_dir, meta)
