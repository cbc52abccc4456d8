"""EKG's memory bank: the logits of J teacher sub-networks for every clean training image, stored once.

Unlike the soft-label cache (`kesi_dist.distill.soft_label_cache`: ensemble probabilities per (epoch,
augmented image)), a memory bank is epoch-independent: the teachers see each training image once,
unaugmented, in sample order, and the student's augmented views are all matched to those fixed logits
(Lee & Song, ECCV 2022). Teachers are kept apart ([n, C, J], teacher 0
the best) because the curriculum loss (`kesi_dist.distill.curriculum`) picks a subset per batch.

BatchNorm runs on batch statistics, as in the search that chose the teachers (their running
statistics are the unpruned network's and do not fit a sub-network); the batches are those of the
pass (`batch_size` consecutive images in sample order, whichever actor computes them), so the bank
does not depend on how the pass was split.

Layout of a bank folder (`kesi_dist.distill.shards`' guarantees: every file written atomically, meta.json
last with each shard's size and sha256, checked before a shard is trusted, `allow_pickle=False`):
    meta.json                      format, key, teachers, num_classes, train_size, holdout, shards
    <key12>-s<shard>-samples.npy   int64 [n]          positions in train.beton
    <key12>-s<shard>-logits.npy    float32 [n, C, J]
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from kesi_dist import storage
from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
from kesi_dist.data.loaders import make_loader
from kesi_dist.distill.shards import load_npy, verified
from kesi_dist.errors import RunError
from kesi_dist.train.bn import batch_statistics
from kesi_dist.train.devices import compute_device

__all__ = ["BANK_FORMAT", "BANK_KINDS", "bank_key", "MemoryBankWorker", "MemoryBank"]

BANK_FORMAT = "kesi_dist/memory-bank/v1"
BANK_KINDS = ("samples", "logits")


def bank_key(*, teacher_hashes: list[str], data_fingerprint: str, resolution: int, batch_size: int,
             holdout: str | None) -> str:
    """sha256 over what determines the bank: teacher files (in order), data, resolution, the pass's batch
    (batch-statistics BN) and the held-out indices left out."""
    doc = {"format": BANK_FORMAT, "teachers": list(teacher_hashes), "data": data_fingerprint,
           "resolution": int(resolution), "batch_size": int(batch_size), "holdout": holdout}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class MemoryBankWorker:
    """The teachers and a clean train loader in sample order (one per actor of the pass)."""

    def __init__(self, teacher_paths: list[str], data_dir: str, *, batch_size: int, resolution: int, backend: str,
                 loader_workers: int, threads: int, gpus: float, holdout: float = 0, holdout_seed: int = 0):
        self.threads = threads
        torch.set_num_threads(threads)
        self.device = compute_device(gpus)  # a GPU request without CUDA stops here, naming the node
        self.teachers = []
        for path in teacher_paths:
            model, _ = model_from_checkpoint(load_checkpoint(path))
            self.teachers.append(model.to(self.device).requires_grad_(False))
        self.loader = make_loader(data_dir, "train", batch_size=batch_size, resolution=resolution, augment="none",
                                  backend=backend, num_workers=loader_workers, shuffle=False, drop_last=False,
                                  device=self.device, return_indices=True, holdout=holdout, holdout_seed=holdout_seed)
        torch.set_num_threads(threads)

    def info(self) -> dict:
        return {"device": str(self.device), "torch_threads": self.threads, "batches": len(self.loader)}

    @torch.no_grad()
    def compute(self, unit: int, first: int, stop: int) -> dict:
        """Every teacher's logits on batches first..stop-1 of the clean pass (work unit `unit`)."""
        start = time.perf_counter()
        bs = self.loader.batch_size
        self.loader.set_window(first * bs, stop * bs)
        self.loader.set_epoch(0)
        samples, logits = [], []
        for images, _labels, indices in self.loader:
            if torch.get_num_threads() != self.threads:  # FFCV resets it when an epoch starts
                torch.set_num_threads(self.threads)
            outs = []
            for t in self.teachers:
                with batch_statistics(t):
                    outs.append(t(images).float().cpu())
            logits.append(torch.stack(outs, -1))
            samples.append(indices.cpu())
        return {"shard": unit, "batches": list(range(first, stop)),
                "samples": torch.cat(samples).numpy().astype(np.int64),
                "logits": torch.cat(logits).numpy().astype(np.float32), "compute_s": time.perf_counter() - start}


class MemoryBank:
    """Read side: the whole bank in memory ([train_size, C, J] float32; 10 MB for CIFAR-10 with 5
    teachers), every shard checked against meta.json; `lookup(indices)` gives a batch's teacher logits."""

    def __init__(self, out_dir: str | Path):
        self.dir = out_dir if storage.is_uri(out_dir) else Path(out_dir)
        path = storage.join(self.dir, "meta.json")
        if not storage.is_file(path):
            raise RunError(f"{path}: missing; the memory bank is not built or did not finish (it writes meta.json last)")
        try:
            meta = json.loads(storage.read_text(path))
        except ValueError as e:
            raise RunError(f"{path}: not valid JSON ({e}); delete {self.dir} to rebuild the memory bank") from None
        if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
            raise RunError(f"{path}: not a kesi_dist memory bank (format {BANK_FORMAT!r} expected)")
        self.meta = meta
        self.num_classes, self.teachers = int(meta["num_classes"]), len(meta["teachers"])
        size = int(meta["train_size"])
        logits = np.zeros((size, self.num_classes, self.teachers), np.float32)
        seen = np.zeros(size, np.int64)
        for shard in meta["shards"]:
            s = load_npy(*verified(self.dir, shard["files"]["samples"]))
            v = load_npy(*verified(self.dir, shard["files"]["logits"]))
            if s.ndim != 1 or v.shape != (len(s), self.num_classes, self.teachers) or (
                    len(s) and (s.min() < 0 or s.max() >= size)):
                raise RunError(f"{storage.join(self.dir, shard['files']['logits']['name'])}: shard arrays have "
                               f"inconsistent shapes; delete {self.dir} to rebuild")
            logits[s] = v
            np.add.at(seen, s, 1)
        expected = np.ones(size, np.int64)
        if meta.get("holdout"):
            expected[meta["holdout"]["indices"]] = 0  # held out: no student trains on them, no row
        if not (seen == expected).all():
            bad = int(np.flatnonzero(seen != expected)[0])
            raise RunError(f"{self.dir}: sample {bad} has {int(seen[bad])} rows (expected {int(expected[bad])}); "
                           f"delete {self.dir} to rebuild")
        self.logits, self.present = torch.from_numpy(logits), torch.from_numpy(expected.astype(bool))

    def check(self, *, holdout: tuple[float, int] = (0, 0)) -> None:
        """RunError unless the bank left out the same held-out images the student's loader does."""
        held = self.meta.get("holdout") or {"holdout": 0, "seed": 0}
        if (held["holdout"], held["seed"]) != tuple(holdout):
            raise RunError(f"{self.dir}: the memory bank was built with holdout {held['holdout']!r} (seed "
                           f"{held['seed']}), the student trains with {holdout[0]!r} (seed {holdout[1]}); rebuild it")

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Teacher logits [B, C, J] of training samples `indices` (positions in train.beton)."""
        idx = indices.detach().to("cpu", torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self.present) or
                            not bool(self.present[idx].all())):
            raise RunError(f"{self.dir}: no bank row for some of samples {idx.tolist()[:8]} (held out, or another "
                           "dataset)")
        return self.logits[idx]
