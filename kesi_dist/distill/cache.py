"""Cached soft labels: one pass of the teacher ensemble over E epochs of augmented training images.

The loaders make order and augmentation pure functions of (seed, epoch, sample index), so the image
a student sees at (epoch e, sample i) can be reproduced anywhere, whatever its world size, batch
size or shuffling. `build_soft_label_cache` runs the frozen ensemble once over every (epoch, sample)
pair of the train split with the student's seed, resolution and augmentation, and stores the top-k
of the ensemble's temperature-softened probabilities; during distillation `SoftLabelCache.lookup`
returns a batch's soft labels from its (epoch, indices) and no teacher runs.

Work is split across a pool of Ray actors (the caller initialises Ray), each holding the whole
ensemble. Every epoch is read in sample order (no shuffling, no dropped samples) and cut into work
units of consecutive batches; the driver hands the next unit to whichever actor is free (so a slow
or busy node does less, not the same share late), and an actor's loader reads only its unit's
samples. Results come back to the driver, which writes one shard per unit, so actors may live on
other nodes as long as they can read the dataset folder.

Layout of `out_dir`:
    meta.json                                   written last, atomically: its presence = complete
    <key12>-e<epoch>-s<shard>-samples.npy       int64 [n]       sample indices of the shard
    <key12>-e<epoch>-s<shard>-values.npy        float32 [n, k]  top-k probabilities (or float16)
    <key12>-e<epoch>-s<shard>-indices.npy       int16/int32 [n, k]  their classes
`out_dir` may be a storage URI (`kesi_dist.storage`): shards and meta.json are then written and read
through it, atomically as on a local disk.
Every file is written to a temp name and renamed; meta.json records each file's size and sha256,
and a reader checks both before trusting a file (a truncated or altered shard is an error, never
read as complete). Files load with `allow_pickle=False`.

The cache key hashes what determines the labels: the teacher files' content, the dataset's
fingerprint, seed, epochs, resolution, augmentation, temperature, top-k and value dtype. A
complete cache with the same key is reused as is.
"""

from __future__ import annotations

import collections
import fnmatch
import hashlib
import io
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kesi_dist import storage
from kesi_dist.distill.losses import dense_from_topk
from kesi_dist.errors import KesiError, RunError, UsageError

__all__ = ["FORMAT", "build_soft_label_cache", "SoftLabelCache", "cache_key", "file_sha256", "work_units"]

FORMAT = "kesi_dist/soft-labels/v1"
_KINDS = ("samples", "values", "indices")
_VALUE_DTYPES = ("float32", "float16")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a local file or a storage URI, streamed."""
    h = hashlib.sha256()
    fs, p = storage.storage_fs(path)
    with fs.open_input_stream(p) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _abs(path: str | Path) -> str:
    """What actors on any node are given: a URI as is, a local path made absolute."""
    return path if storage.is_uri(path) else str(Path(path).resolve())


def cache_key(*, teacher_hashes: list[str], data_fingerprint: str, seed: int, epochs: int, resolution: int,
              augment: str, temperature: float, topk: int, values_dtype: str) -> str:
    """sha256 over everything that determines the stored soft labels (teacher order included)."""
    doc = {"format": FORMAT, "teachers": list(teacher_hashes), "data": data_fingerprint, "seed": int(seed),
           "epochs": int(epochs), "resolution": int(resolution), "augment": augment,
           "temperature": float(temperature), "topk": int(topk), "values_dtype": values_dtype}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _data_fingerprint(data_dir: str | Path) -> tuple[str, dict]:
    from kesi_dist.data.loaders import read_meta

    meta = read_meta(data_dir)
    fp = meta.get("fingerprint") or hashlib.sha256(storage.read_bytes(storage.join(data_dir, "meta.json"))).hexdigest()
    return fp, meta


def _save_npy(path: str | Path, array: np.ndarray) -> dict:
    """np.save, written atomically (local or URI, see kesi_dist.storage); returns {name, bytes, sha256}."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getvalue()
    storage.write_bytes(path, data)
    return {"name": os.path.basename(str(path)), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _verified(out_dir: str | Path, entry: dict) -> tuple[str, bytes]:
    """(path, content) of a shard whose size and sha256 match its meta.json entry (read once)."""
    path = storage.join(out_dir, entry["name"])
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise RunError(f"{path}: soft-label shard missing; delete {out_dir} to rebuild the cache") from None
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        what = f"{len(data)} bytes, expected {entry['bytes']}" if len(data) != entry["bytes"] else "content hash differs"
        raise RunError(f"{path}: soft-label shard is truncated or corrupt ({what}); delete {out_dir} to rebuild")
    return path, data


def _load_npy(path: str, data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RunError(f"{path}: not a readable .npy soft-label shard ({e})") from None


def _complete_meta(out_dir: str | Path, key: str) -> dict | None:
    """The meta of a complete, intact cache with `key` in `out_dir`, else None."""
    path = storage.join(out_dir, "meta.json")
    if not storage.is_file(path):
        return None
    try:
        meta = json.loads(storage.read_text(path))
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        for shard in meta["shards"]:
            for kind in _KINDS:
                _verified(out_dir, shard["files"][kind])
    except (ValueError, KeyError, TypeError, RunError):
        return None
    return meta


def work_units(batches: int, epochs: int, actors: int, per_actor: int = 8) -> list[tuple[int, int, int, int]]:
    """(epoch, unit, first batch, stop batch) of the pass: each epoch cut into runs of consecutive
    batches, about `per_actor` units per actor in all, so that handing units to free actors balances
    the load to within one unit."""
    per_epoch = max(1, min(batches, math.ceil(per_actor * actors / epochs)))
    bounds = [round(i * batches / per_epoch) for i in range(per_epoch + 1)]
    return [(e, u, bounds[u], bounds[u + 1]) for e in range(epochs) for u in range(per_epoch)]


class _SoftLabelWorker:
    """A Ray actor body: the frozen ensemble and a train loader in sample order."""

    def __init__(self, teacher_paths: list[str], data_dir: str, *, batch_size: int, resolution: int, augment: str,
                 seed: int, temperature: float, topk: int, backend: str, loader_workers: int, threads: int,
                 use_gpu: bool, values_dtype: str):
        from kesi_dist.data.loaders import make_loader
        from kesi_dist.distill.ensemble import load_teachers

        self.threads = threads
        torch.set_num_threads(threads)
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.teachers = load_teachers(teacher_paths, self.device)
        self.temperature, self.topk, self.values_dtype = temperature, topk, values_dtype
        self.loader = make_loader(data_dir, "train", batch_size=batch_size, resolution=resolution, augment=augment,
                                  backend=backend, num_workers=loader_workers, seed=seed, shuffle=False,
                                  drop_last=False, device=self.device, return_indices=True)
        for _ in self.loader:  # compile the loader's pipeline now, so it is not timed as part of the pass
            break
        torch.set_num_threads(threads)

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"actor_id": ctx.get_actor_id(), "pid": os.getpid(), "node_id": ctx.get_node_id(),
                "host": socket.gethostname(), "device": str(self.device), "torch_threads": self.threads,
                "batches": len(self.loader)}

    @torch.no_grad()
    def compute(self, epoch: int, unit: int, first: int, stop: int) -> dict:
        """Top-k ensemble probabilities of batches first..stop-1 of `epoch` (work unit `unit`)."""
        from kesi_dist.distill.ensemble import ensemble_probs
        from kesi_dist.distill.losses import topk_probs

        start = time.perf_counter()
        teacher_s = teacher_cpu_s = 0.0  # wall and this thread's CPU time in the teachers
        samples, values, classes = [], [], []
        bs = self.loader.batch_size
        self.loader.set_window(first * bs, stop * bs)
        self.loader.set_epoch(epoch)
        for images, _labels, indices in self.loader:
            if torch.get_num_threads() != self.threads:  # FFCV resets it when an epoch starts
                torch.set_num_threads(self.threads)
            t0, c0 = time.perf_counter(), time.thread_time()
            probs = ensemble_probs(self.teachers, images, self.temperature)
            v, c = topk_probs(probs, self.topk)
            teacher_s += time.perf_counter() - t0
            teacher_cpu_s += time.thread_time() - c0
            samples.append(indices.cpu())
            values.append(v.cpu())
            classes.append(c.cpu())
        batches = list(range(first, stop))
        num_classes = self.teachers[0].num_classes
        k = min(self.topk, num_classes)
        index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
        return {
            "epoch": epoch, "shard": unit, "batches": batches,
            "samples": torch.cat(samples).numpy().astype(np.int64) if samples else np.zeros(0, np.int64),
            "values": (torch.cat(values).numpy() if values else np.zeros((0, k), np.float32)).astype(self.values_dtype),
            "indices": (torch.cat(classes).numpy() if classes else np.zeros((0, k), np.int64)).astype(index_dtype),
            "compute_s": time.perf_counter() - start, "teacher_s": teacher_s, "teacher_cpu_s": teacher_cpu_s,
        }


def _ray_cause(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, KesiError) else err


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
) -> dict:
    """Compute (or reuse) the soft labels of `epochs` epochs of the train split on a pool of Ray actors.

    Ray must already be initialised. Each actor loads the whole ensemble and runs it on the work
    units (runs of consecutive batches) handed to it while it is free (see the module docstring); torch uses int(cpus_per_actor) threads
    in each actor; the loader uses `loader_workers` FFCV threads (at least 1) or, with backend
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

    Returns:
        The cache's meta: key, settings, "actors" (actor index, actor_id, pid, node_id), "shards" (one per
        work unit: epoch, shard, the actor that computed it, batches, count, files with bytes and sha256, compute_s, and the
        wall and CPU seconds spent in the teachers: teacher_s, teacher_cpu_s),
        "timings" (actors_start_s, pass_s, total_s) and "reused" (True when nothing was computed).

    Raises:
        UsageError: bad arguments. RunError: unreadable teachers or data, a failed actor.
    """
    import ray

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
    if values_dtype not in _VALUE_DTYPES:
        raise UsageError(f"soft-label cache: values_dtype {values_dtype!r} must be one of {', '.join(_VALUE_DTYPES)}")
    if cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise UsageError(f"soft-label cache: cpus_per_actor {cpus_per_actor} must be > 0, gpus_per_actor >= 0")
    if not ray.is_initialized():
        raise RunError("build_soft_label_cache needs Ray initialised first (ray.init or kesi's connect_ray)")
    missing = [p for p in teacher_paths if not storage.is_file(p)]
    if missing:
        raise RunError(f"{missing[0]}: no such teacher checkpoint")
    data_fp, data_meta = _data_fingerprint(data_dir)
    # Fail here, with the file's name, rather than inside an actor's constructor.
    from kesi_dist.checkpoint import load_checkpoint

    for path in teacher_paths:
        classes = load_checkpoint(path)["num_classes"]
        if classes != data_meta["num_classes"]:
            raise RunError(f"{path}: teacher predicts {classes} classes, the dataset in {data_dir} has "
                           f"{data_meta['num_classes']}")
    settings = {"seed": int(seed), "epochs": int(epochs), "resolution": int(resolution), "augment": augment,
                "temperature": float(temperature), "topk": int(topk), "values_dtype": values_dtype}
    teacher_hashes = [file_sha256(p) for p in teacher_paths]
    key = cache_key(teacher_hashes=teacher_hashes, data_fingerprint=data_fp, **settings)
    out = out_dir if storage.is_uri(out_dir) else str(out_dir)
    found = _complete_meta(out, key)
    if found is not None:
        return {**found, "reused": True}

    storage.makedirs(out)
    storage.remove(storage.join(out, "meta.json"))  # from here on the folder does not look complete
    for old in fnmatch.filter(storage.listdir(out), "*-e*-s*-*.npy"):
        storage.remove(storage.join(out, old))

    n_batches = math.ceil(int(data_meta["train_size"]) / batch_size)
    used = min(num_actors, n_batches * epochs)  # an actor with no batch would only cost a process
    threads = max(1, int(cpus_per_actor))
    use_gpu = gpus_per_actor > 0
    Worker = ray.remote(_SoftLabelWorker)
    actors = [
        Worker.options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor).remote(
            [_abs(p) for p in teacher_paths], _abs(data_dir), batch_size=batch_size,
            resolution=resolution, augment=augment, seed=seed, temperature=temperature, topk=topk, backend=backend,
            loader_workers=loader_workers, threads=threads, use_gpu=use_gpu, values_dtype=values_dtype)
        for _ in range(used)
    ]
    try:
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except ray.exceptions.RayError as e:
            raise _ray_cause(e) from None
        if infos[0]["batches"] != n_batches:
            raise RunError(f"{data_dir}: the loader yields {infos[0]['batches']} batches per epoch, expected "
                           f"{n_batches} for {data_meta['train_size']} images; re-run `kesi data prepare`")
        actors_ready = time.perf_counter()
        todo = collections.deque(work_units(n_batches, epochs, used))
        pending: dict = {}

        def submit(actor: int) -> None:
            epoch, unit, first, stop = todo.popleft()
            pending[actors[actor].compute.remote(epoch, unit, first, stop)] = actor

        for a in range(min(used, len(todo))):
            submit(a)
        shards = []
        prefix = key[:12]
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            try:
                r = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise _ray_cause(e) from None
            if todo:  # keep the actor busy while this unit's files are written
                submit(actor)
            stem = f"{prefix}-e{r['epoch']:04d}-s{r['shard']:03d}"
            files = {kind: _save_npy(storage.join(out, f"{stem}-{kind}.npy"), r[kind]) for kind in _KINDS}
            info = infos[actor]
            shards.append({"epoch": r["epoch"], "shard": r["shard"], "actor": actor, "actor_id": info["actor_id"],
                           "pid": info["pid"], "node_id": info["node_id"], "batches": r["batches"],
                           "count": int(len(r["samples"])), "files": files, "compute_s": round(r["compute_s"], 4),
                           "teacher_s": round(r["teacher_s"], 4), "teacher_cpu_s": round(r["teacher_cpu_s"], 4)})
        pass_s = time.perf_counter() - actors_ready
    finally:
        for a in actors:
            ray.kill(a)
    shards.sort(key=lambda s: (s["epoch"], s["shard"]))
    first = shards[0]["files"]["values"]
    k = int(_load_npy(*_verified(out, first)).shape[1])
    meta = {
        "format": FORMAT, "key": key, **settings, "topk_stored": k, "batch_size": int(batch_size),
        "num_classes": int(data_meta["num_classes"]), "train_size": int(data_meta["train_size"]),
        "data_dir": _abs(data_dir), "data_fingerprint": data_fp,
        "teachers": [{"path": str(p), "sha256": h} for p, h in zip(teacher_paths, teacher_hashes)],
        "num_actors": used, "batches_per_epoch": n_batches,
        "actors": [{"actor": i, **infos[i]} for i in range(used)],
        "shards": shards,
        "timings": {"actors_start_s": round(actors_ready - start, 4), "pass_s": round(pass_s, 4),
                    "total_s": round(time.perf_counter() - start, 4)},
        "created": time.time(),
    }
    storage.write_text(storage.join(out, "meta.json"), json.dumps(meta, indent=1) + "\n")
    return {**meta, "reused": False}


class SoftLabelCache:
    """Read side of a cache written by `build_soft_label_cache`.

    One epoch is held in memory at a time (dense [train_size, k] arrays); its shard files are
    checked against the sizes and sha256 recorded in meta.json when the epoch is first read.
    """

    def __init__(self, out_dir: str | Path):
        self.dir = out_dir if storage.is_uri(out_dir) else Path(out_dir)
        path = storage.join(self.dir, "meta.json")
        if not storage.is_file(path):
            raise RunError(f"{path}: missing; the soft-label cache is not built or did not finish "
                           "(build_soft_label_cache writes it last)")
        try:
            meta = json.loads(storage.read_text(path))
        except ValueError as e:
            raise RunError(f"{path}: not valid JSON ({e}); delete {self.dir} to rebuild the cache") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RunError(f"{path}: not a kesi_dist soft-label cache (format {FORMAT!r} expected)")
        self.meta = meta
        self.epochs = int(meta["epochs"])
        self.num_classes = int(meta["num_classes"])
        self.size = int(meta["train_size"])
        self.k = int(meta["topk_stored"])
        self._epoch: int | None = None
        self._values: torch.Tensor | None = None
        self._classes: torch.Tensor | None = None

    def check(self, *, seed: int, resolution: int, augment: str, epochs: int | None = None,
              data_fingerprint: str | None = None) -> None:
        """RunError unless the cache was built for these loader settings (and covers `epochs`)."""
        want: dict[str, Any] = {"seed": seed, "resolution": resolution, "augment": augment}
        if data_fingerprint is not None:
            want["data_fingerprint"] = data_fingerprint
        for name, value in want.items():
            if self.meta.get(name) != value:
                raise RunError(f"{self.dir}: soft labels were computed with {name}={self.meta.get(name)!r}, the "
                               f"student uses {value!r}; rebuild the cache for this run's settings")
        if epochs is not None and epochs > self.epochs:
            raise RunError(f"{self.dir}: soft labels cover {self.epochs} epochs, the student trains {epochs}; "
                           "rebuild the cache with more epochs")

    def _load_epoch(self, epoch: int) -> None:
        values = np.zeros((self.size, self.k), np.float32)
        classes = np.zeros((self.size, self.k), np.int64)
        seen = np.zeros(self.size, np.int64)
        for shard in self.meta["shards"]:
            if shard["epoch"] != epoch:
                continue
            arrays = {kind: _load_npy(*_verified(self.dir, shard["files"][kind])) for kind in _KINDS}
            s, v, c = arrays["samples"], arrays["values"], arrays["indices"]
            if s.ndim != 1 or v.shape != (len(s), self.k) or c.shape != (len(s), self.k) or (
                    len(s) and (s.min() < 0 or s.max() >= self.size)):
                raise RunError(f"{self.dir / shard['files']['values']['name']}: shard arrays have inconsistent "
                               f"shapes; delete {self.dir} to rebuild")
            values[s] = v
            classes[s] = c
            np.add.at(seen, s, 1)
        if not (seen == 1).all():
            bad = int(np.flatnonzero(seen != 1)[0])
            raise RunError(f"{self.dir}: epoch {epoch} covers sample {bad} {int(seen[bad])} times (expected once); "
                           f"delete {self.dir} to rebuild")
        self._values, self._classes = torch.from_numpy(values), torch.from_numpy(classes)
        self._epoch = epoch

    def lookup(self, epoch: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k probabilities (float32 [B, k]) and their classes (int64 [B, k]) of samples `indices` at `epoch`."""
        if not 0 <= epoch < self.epochs:
            raise RunError(f"{self.dir}: no soft labels for epoch {epoch}; the cache covers epochs 0..{self.epochs - 1}")
        if epoch != self._epoch:
            self._load_epoch(epoch)
        idx = indices.detach().to("cpu", torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.size):
            raise RunError(f"{self.dir}: sample index out of range 0..{self.size - 1} (a different dataset?)")
        return self._values[idx], self._classes[idx]

    def probs(self, epoch: int, indices: torch.Tensor) -> torch.Tensor:
        """Dense [B, num_classes] soft labels (`dense_from_topk` of `lookup`)."""
        values, classes = self.lookup(epoch, indices)
        return dense_from_topk(values, classes, self.num_classes)
