"""Cached soft labels: one pass of the teacher ensemble over E epochs of augmented training images.

The loaders make order and augmentation pure functions of (seed, epoch, sample index), so the image
a student sees at (epoch e, sample i) can be reproduced anywhere, whatever its world size, batch
size or shuffling. The soft-label pass runs the frozen ensemble once over every (epoch, sample)
pair of the train split with the student's seed, resolution and augmentation, and stores the top-k
of the ensemble's temperature-softened probabilities; during distillation `SoftLabelCache.lookup`
returns a batch's soft labels from its (epoch, indices) and no teacher runs.

This module is the format, plain PyTorch: `SoftLabelWorker` computes one work unit (a run of
consecutive batches of one epoch, read in sample order, no shuffling or dropped samples), and
`SoftLabelCache` reads a finished cache. `kesi_dist.stages.soft_labels.build_soft_label_cache` runs
the workers on a pool of Ray actors and writes one shard per unit as results arrive. What every keyed,
sharded cache shares (shard files, their checks, work units) is `kesi_dist.distill.shards`.

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

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kesi_dist import storage
from kesi_dist.data.loaders import make_loader
from kesi_dist.distill.ensemble import ensemble_probs, load_teachers
from kesi_dist.distill.losses import dense_from_topk, topk_probs
from kesi_dist.distill.shards import load_npy, verified
from kesi_dist.errors import RunError
from kesi_dist.train.devices import compute_device

__all__ = ["FORMAT", "KINDS", "VALUE_DTYPES", "SoftLabelWorker", "SoftLabelCache", "cache_key"]

FORMAT = "kesi_dist/soft-labels/v1"
KINDS = ("samples", "values", "indices")
VALUE_DTYPES = ("float32", "float16")


def cache_key(*, teacher_hashes: list[str], data_fingerprint: str, seed: int, epochs: int, resolution: int,
              augment: str, temperature: float, topk: int, values_dtype: str, holdout: str | None = None) -> str:
    """sha256 over everything that determines the stored soft labels (teacher order included);
    `holdout`: the sha256 of the held-out indices the pass leaves out (None: no holdout)."""
    doc = {"format": FORMAT, "teachers": list(teacher_hashes), "data": data_fingerprint, "seed": int(seed),
           "epochs": int(epochs), "resolution": int(resolution), "augment": augment,
           "temperature": float(temperature), "topk": int(topk), "values_dtype": values_dtype}
    if holdout is not None:  # absent without a holdout: keys of earlier caches stay valid
        doc["holdout"] = holdout
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class SoftLabelWorker:
    """The frozen ensemble and a train loader in sample order (one per actor of the pass)."""

    def __init__(self, teacher_paths: list[str], data_dir: str, *, batch_size: int, resolution: int, augment: str,
                 seed: int, temperature: float, topk: int, backend: str, loader_workers: int, threads: int,
                 gpus: float, values_dtype: str, expected_batches: int | None = None, holdout: float = 0,
                 holdout_seed: int = 0):
        self.threads = threads
        torch.set_num_threads(threads)
        self.device = compute_device(gpus)  # a GPU request without CUDA stops here, naming the node
        self.teachers = load_teachers(teacher_paths, self.device)
        self.temperature, self.topk, self.values_dtype = temperature, topk, values_dtype
        self.loader = make_loader(data_dir, "train", batch_size=batch_size, resolution=resolution, augment=augment,
                                  backend=backend, num_workers=loader_workers, seed=seed, shuffle=False,
                                  drop_last=False, device=self.device, return_indices=True, holdout=holdout,
                                  holdout_seed=holdout_seed)
        if expected_batches is not None and len(self.loader) != expected_batches:
            raise RunError(f"{data_dir}: the loader yields {len(self.loader)} batches per epoch, expected "
                           f"{expected_batches}; re-run `kesi data prepare`")
        for _ in self.loader:  # compile the loader's pipeline now, so it is not timed as part of the pass
            break
        torch.set_num_threads(threads)

    def info(self) -> dict:
        return {"device": str(self.device), "torch_threads": self.threads, "batches": len(self.loader)}

    @torch.no_grad()
    def compute(self, epoch: int, unit: int, first: int, stop: int) -> dict:
        """Top-k ensemble probabilities of batches first..stop-1 of `epoch` (work unit `unit`)."""
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


class SoftLabelCache:
    """Read side of a cache written by the soft-label pass (`kesi_dist.stages.soft_labels`).

    One epoch is held in memory at a time (dense [train_size, k] arrays); its shard files are
    checked against the sizes and sha256 recorded in meta.json when the epoch is first read.
    """

    def __init__(self, out_dir: str | Path):
        self.dir = out_dir if storage.is_uri(out_dir) else Path(out_dir)
        path = storage.join(self.dir, "meta.json")
        if not storage.is_file(path):
            raise RunError(f"{path}: missing; the soft-label cache is not built or did not finish "
                           "(the soft-label pass writes it last)")
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
              data_fingerprint: str | None = None, holdout: tuple[float, int] = (0, 0)) -> None:
        """RunError unless the cache was built for these loader settings (and covers `epochs`);
        `holdout`: (data.holdout, its seed) of the student's train loader."""
        held = self.meta.get("holdout") or {"holdout": 0, "seed": 0}
        if (held["holdout"], held["seed"]) != tuple(holdout):
            raise RunError(f"{self.dir}: soft labels were computed with holdout {held['holdout']!r} (seed "
                           f"{held['seed']}), the student trains with {holdout[0]!r} (seed {holdout[1]}); "
                           "rebuild the cache for this run's settings")
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
            arrays = {kind: load_npy(*verified(self.dir, shard["files"][kind])) for kind in KINDS}
            s, v, c = arrays["samples"], arrays["values"], arrays["indices"]
            if s.ndim != 1 or v.shape != (len(s), self.k) or c.shape != (len(s), self.k) or (
                    len(s) and (s.min() < 0 or s.max() >= self.size)):
                raise RunError(f"{self.dir / shard['files']['values']['name']}: shard arrays have inconsistent "
                               f"shapes; delete {self.dir} to rebuild")
            values[s] = v
            classes[s] = c
            np.add.at(seen, s, 1)
        # Every training sample once; the held-out ones (no student trains on them) never.
        expected = np.ones(self.size, np.int64)
        if self.meta.get("holdout"):
            expected[self.meta["holdout"]["indices"]] = 0
        if not (seen == expected).all():
            bad = int(np.flatnonzero(seen != expected)[0])
            raise RunError(f"{self.dir}: epoch {epoch} covers sample {bad} {int(seen[bad])} times (expected "
                           f"{int(expected[bad])}); delete {self.dir} to rebuild")
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
