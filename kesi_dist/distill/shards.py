"""What every keyed, sharded cache of kesi_dist shares (the soft-label cache, `soft_label_cache`; the
memory bank, `memory_bank_cache`): a folder of `.npy` shards, one per work unit of an actor pool's pass,
and `meta.json` written last with each shard's size and sha256.

Every file is written atomically (`kesi_dist.storage`); a reader checks a shard's size and sha256 before
trusting it (a truncated or altered shard is an error, never read as complete), and loads it with
`allow_pickle=False`. `complete_meta` says whether a folder already holds a complete cache for a key.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np

from kesi_dist import storage
from kesi_dist.checkpoint import load_checkpoint
from kesi_dist.data.loaders import read_meta
from kesi_dist.errors import RunError

__all__ = ["file_sha256", "data_fingerprint", "check_teachers", "save_npy", "verified", "load_npy", "complete_meta",
           "work_units"]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a local file or a storage URI, streamed."""
    h = hashlib.sha256()
    fs, p = storage.storage_fs(path)
    with fs.open_input_stream(p) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(data_dir: str | Path) -> tuple[str, dict]:
    """(the prepared data's fingerprint, its meta.json)."""
    meta = read_meta(data_dir)
    fp = meta.get("fingerprint") or hashlib.sha256(storage.read_bytes(storage.join(data_dir, "meta.json"))).hexdigest()
    return fp, meta


def check_teachers(teacher_paths: list[str], data_dir: str | Path) -> tuple[str, dict]:
    """(data fingerprint, meta) after checking that every teacher file exists and predicts the dataset's
    classes: fails here, naming the file, rather than inside an actor's constructor."""
    if not teacher_paths:
        raise RunError("no teacher checkpoints given")
    missing = [p for p in teacher_paths if not storage.is_file(p)]
    if missing:
        raise RunError(f"{missing[0]}: no such teacher checkpoint")
    data_fp, data_meta = data_fingerprint(data_dir)
    for path in teacher_paths:
        classes = load_checkpoint(path)["num_classes"]
        if classes != data_meta["num_classes"]:
            raise RunError(f"{path}: teacher predicts {classes} classes, the dataset in {data_dir} has "
                           f"{data_meta['num_classes']}")
    return data_fp, data_meta


def save_npy(path: str | Path, array: np.ndarray) -> dict:
    """np.save, written atomically (local or URI, see kesi_dist.storage); returns {name, bytes, sha256}."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getvalue()
    storage.write_bytes(path, data)
    return {"name": storage.basename(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verified(out_dir: str | Path, entry: dict) -> tuple[str, bytes]:
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


def load_npy(path: str, data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RunError(f"{path}: not a readable .npy soft-label shard ({e})") from None


def complete_meta(out_dir: str | Path, key: str, fmt: str, kinds: tuple[str, ...]) -> dict | None:
    """The meta of a complete, intact cache (format `fmt`, shard files `kinds`) with `key` in `out_dir`,
    else None."""
    path = storage.join(out_dir, "meta.json")
    if not storage.is_file(path):
        return None
    try:
        meta = json.loads(storage.read_text(path))
        if meta.get("format") != fmt or meta.get("key") != key:
            return None
        for shard in meta["shards"]:
            for kind in kinds:
                verified(out_dir, shard["files"][kind])
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
