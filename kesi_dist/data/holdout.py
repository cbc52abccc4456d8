"""The held-out selection split: part of the training data that no model trains on.

Every choice a method makes by accuracy (the best branch, ASHA's stops, teacher policies, a search's
score) is made on it, so the test split (`val.beton`: CIFAR's test set, Tiny-ImageNet's val set) is
only ever reported. It is carved from `train.beton` per class: `holdout` < 1 is a fraction of each
class (rounded, at least one image), `holdout` >= 1 a count per class; the images of each class are
drawn with a generator seeded by `seed` alone, so every node, loader and resume picks the same ones.
`0` means no holdout (selection then uses the test split, and the report says so).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from kesi_dist.errors import BadValue

__all__ = ["holdout_indices", "split_train", "describe_holdout"]


def holdout_indices(labels: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """Sorted positions (into the train split) of the held-out images; empty for `holdout` 0.

    Raises:
        BadValue("holdout", ...): negative, a fraction or count that leaves a class with no training
            image, or a count that is not a whole number.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if holdout == 0:
        return np.zeros(0, np.int64)
    if holdout < 0 or (holdout >= 1 and holdout != int(holdout)):
        raise BadValue("holdout", f"{holdout!r}: a fraction of each class in (0, 1), a whole count of images "
                                  "per class >= 1, or 0 for none")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x401D]))
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, round(holdout * len(members))) if holdout < 1 else int(holdout)
        if n >= len(members):
            raise BadValue("holdout", f"{holdout!r} takes {n} of the {len(members)} training images of class "
                                      f"{int(c)}, leaving none to train on; lower it")
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked)).astype(np.int64)


@functools.lru_cache(maxsize=8)
def _cached_labels(beton: str, size: int, mtime_ns: int) -> np.ndarray:
    from kesi_dist.data.beton import BetonFile

    return BetonFile(beton).labels


def _train_labels(data_dir: str | Path) -> np.ndarray:
    """Labels of a local prepared folder's train split, read once per process and file version."""
    beton = Path(data_dir) / "train.beton"
    st = beton.stat()
    return _cached_labels(str(beton.resolve()), st.st_size, st.st_mtime_ns)


def split_train(data_dir: str | Path, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training positions, held-out positions) of a local prepared folder's train split."""
    labels = _train_labels(data_dir)
    held = holdout_indices(labels, holdout, seed)
    keep = np.ones(len(labels), bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.int64), held


def describe_holdout(data_dir: str | Path, holdout: float, seed: int, with_indices: bool = False) -> dict:
    """What a run records about its holdout: the setting, its size (per class too), its indices' sha256
    (and the indices themselves with `with_indices`). `data_dir` may be a storage URI."""
    from kesi_dist import storage

    local = storage.local_copy(str(data_dir))
    train, held = split_train(local, holdout, seed)
    counts = np.bincount(_train_labels(local)[held]) if len(held) else np.zeros(0, np.int64)
    counts = counts[counts > 0]
    return {"holdout": holdout, "seed": int(seed), "size": int(len(held)), "train_size": int(len(train)),
            "per_class": [int(counts.min()), int(counts.max())] if len(counts) else [0, 0],
            "sha256": hashlib.sha256(held.tobytes()).hexdigest(), **({"indices": held.tolist()} if with_indices else {})}
