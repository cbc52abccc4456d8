"""Loaders over a prepared dataset folder (`train.beton`, `val.beton`, `meta.json`).

Two backends yield the same batches for the same (seed, epoch):

- `ffcv` (default): FFCV's compiled `Loader`. On CPU the pipeline is decode -> crop/flip ->
  normalise to float32 NCHW (all numba, parallel over `num_workers` threads) -> `ToTensor`; the
  batch is then copied out of FFCV's reused buffers. With CUDA, uint8 batches are moved by
  `ToDevice(non_blocking=True)`, made `channels_last` by `ToTorchImage`, and normalised on the GPU.
- `torch`: a plain `torch.utils.data.DataLoader` (worker processes) over the *same* `.beton`
  files, read by `kesi_dist.data.beton.BetonFile`. It is the fallback where FFCV's numba pipeline
  cannot run, and the reference for parity tests: same shards, same augmentation parameters (both
  call `kesi_dist.data.augment`) and the same resize code, so pixels agree exactly.

Augmentations (train split only; val is never augmented):
- "cifar": pad 4 + random crop, horizontal flip, at the stored side (resized first if
  `resolution` differs);
- "imagenet": train: random resized crop (scale 0.08-1, ratio 3/4-4/3) to `resolution` + flip;
  val: center crop of 0.875 x the side resized to `resolution` (= resize to resolution / 0.875,
  center crop);
- "none": the image resized to `resolution` if needed.

Order and augmentation are functions of (seed, epoch, sample index): `set_epoch(e)` before
iterating replays epoch e exactly (a resumed run sees the same batches). Without `set_epoch`,
each new iteration advances to the next epoch. With `distributed=True` the rank and world size come
from `torch.distributed`; rank r reads every world_size-th sample of the epoch's permutation, so
shards are disjoint; with `drop_last` (the train default) every rank gets the same number of
samples (at most world_size - 1 skipped per epoch), otherwise their union is the whole split.

Why kesi brings its own order and random ops to FFCV 1.0.2: its RANDOM order seeds each epoch
with `default_rng(seed + epoch)` (seed s, epoch e+1 replays seed s+1, epoch e) and, distributed,
uses torch's DistributedSampler, which pads shards with repeated samples; QUASI_RANDOM raises
NotImplementedError when distributed; and its augmentations draw from numba's per-thread generators,
which cannot be seeded reproducibly. See `kesi_dist.data.ffcv_ops`.

Note: FFCV sets torch's intra-op thread count to `num_workers` when a loader is built or iterated.

This module holds `read_meta` and `make_loader`; the plan and the shared base are in
`kesi_dist.data.image_loader`, the backends in `kesi_dist.data.ffcv_loader` and
`kesi_dist.data.torch_loader`.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torch

from kesi_dist import storage
from kesi_dist.data.ffcv_loader import FFCVLoader
from kesi_dist.data.image_loader import CIFAR_PAD, ImageLoader, augment_plan
from kesi_dist.data.torch_loader import TorchLoader
from kesi_dist.errors import BadValue, RunError, UsageError

__all__ = ["read_meta", "make_loader", "split_tensors", "ImageLoader", "AUGMENTS", "BACKENDS", "SPLITS", "LOADER_SPLITS", "CIFAR_PAD"]

AUGMENTS = ("cifar", "imagenet", "none")
BACKENDS = ("ffcv", "torch")
SPLITS = ("train", "val")  # the files of a prepared folder
LOADER_SPLITS = (*SPLITS, "holdout")  # "holdout": the held-out part of train.beton (kesi_dist.data.holdout)
_META_KEYS = ("num_classes", "train_size", "val_size", "resolution", "mean", "std", "class_names")


def read_meta(data_dir: str | Path) -> dict:
    """The `meta.json` of a prepared folder (a path or storage URI); RunError if the folder is missing
    or incomplete. On a URI the .beton files are only checked (recorded sizes); `make_loader` fetches
    them to the node-local cache."""
    path = storage.join(data_dir, "meta.json")
    if not storage.is_file(path):
        hint = "" if storage.is_uri(data_dir) else f" (run `kesi data prepare --source ... --out {data_dir}`)"
        raise RunError(f"{path}: missing; the dataset is not prepared or preparation did not finish{hint}")
    try:
        meta = json.loads(storage.read_text(path))
    except ValueError as e:
        raise RunError(f"{path}: not valid JSON ({e}); re-run `kesi data prepare`") from None
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise RunError(f"{path}: missing key {missing[0]!r}; re-run `kesi data prepare`")
    for split in SPLITS:
        beton = storage.join(data_dir, f"{split}.beton")
        if not storage.is_file(beton):
            raise RunError(f"{beton}: missing although meta.json exists; re-run `kesi data prepare`")
        expected = (meta.get("bytes") or {}).get(f"{split}.beton")  # recorded since prepare wrote sizes
        size = storage.size(beton)
        if expected is not None and size != expected:
            raise RunError(f"{beton}: {size} bytes but meta.json says {expected} (truncated or replaced); "
                           "re-run `kesi data prepare`")
    return meta


def _dist_info(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("make_loader(distributed=True) needs torch.distributed initialised first "
                         "(Ray Train workers do this; otherwise call torch.distributed.init_process_group)")
    return dist.get_rank(), dist.get_world_size()


# Loaders kept for reuse in this process (`reuse=True`): an FFCV loader compiles its pipeline (numba)
# when it is built, seconds per loader, and a Tune trial process that trains branch after branch, or a
# driver that evaluates then distils, asks for the same loaders again. A few at most: each holds its
# memory map and batch buffers.
_REUSABLE: "collections.OrderedDict[tuple, ImageLoader]" = collections.OrderedDict()
_REUSABLE_MAX = 4


def make_loader(data_dir: str | Path, split: str, *, batch_size: int, resolution: int, augment: str = "cifar",
                backend: str = "ffcv", num_workers: int = 2, seed: int = 0, distributed: bool = False,
                shuffle: bool | None = None, drop_last: bool | None = None, device="cpu",
                channels_last: bool = False, return_indices: bool = False, reuse: bool = False,
                holdout: float = 0, holdout_seed: int = 0) -> ImageLoader:
    """A loader over `data_dir/{split}.beton`; see the module docstring for what it yields.

    Args:
        data_dir: a folder written by `prepare_dataset`, or its storage URI (copied once into the
            node-local cache, `kesi_dist.storage.local_copy`).
        split: "train", "val" (the test split, reported) or "holdout" (selection: the held-out part of
            train.beton, served like val: no augmentation, in order).
        batch_size: samples per batch (per rank when distributed).
        resolution: side of the images the model sees.
        augment: "cifar", "imagenet" or "none" (applies to the train split; val is deterministic).
        backend: "ffcv" or "torch".
        num_workers: FFCV threads, or DataLoader worker processes (0 = in the main process).
        seed: seeds the order and the augmentation together with the epoch.
        distributed: shard by torch.distributed rank / world size.
        shuffle: default True for train, False for val.
        drop_last: drop the last incomplete batch and equalise shards; default True for train.
        device: where batches are delivered ("cuda" uses FFCV's ToDevice path when available).
        channels_last: deliver images in channels_last memory format.
        return_indices: also yield each sample's position in the split.
        reuse: hand back a loader this process built before with the same arguments, on the same
            files (identity: path, size and modification time of the .beton and meta.json), instead of
            building (and, for FFCV, compiling) a new one; its window is reset, its epoch is the caller's
            to set. Only for callers that do not share it concurrently.
        holdout, holdout_seed: the held-out selection split (`kesi_dist.data.holdout`): with holdout > 0
            "train" leaves those images out and "holdout" serves them; 0 = none (val is the same either way).
    """
    if split not in LOADER_SPLITS:
        raise UsageError(f"split {split!r}: must be one of {', '.join(LOADER_SPLITS)}")
    if split == "holdout" and not holdout:
        raise BadValue("holdout", "0: there is no held-out split to load (set a fraction or count per class)")
    if augment not in AUGMENTS:
        raise BadValue("augment", f"{augment!r}: must be one of {', '.join(AUGMENTS)}")
    if backend not in BACKENDS:
        raise BadValue("backend", f"{backend!r}: must be one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise BadValue("batch_size", f"{batch_size}: must be >= 1")
    if not 8 <= resolution <= 1024:
        raise BadValue("resolution", f"{resolution}: must be between 8 and 1024")
    if num_workers < 0:
        raise BadValue("num_workers", f"{num_workers}: must be >= 0")
    data_dir = Path(storage.local_copy(data_dir))  # a URI is fetched once per node (FFCV maps local files)
    meta = read_meta(data_dir)
    subset = None
    if split != "val" and holdout:
        from kesi_dist.data.holdout import split_train

        kept, held = split_train(data_dir, holdout, holdout_seed)
        subset = held if split == "holdout" else kept
    train = split == "train"  # augmented, shuffled, last batch dropped (by default)
    file = "val" if split == "val" else "train"
    shuffle = train if shuffle is None else bool(shuffle)
    drop_last = train if drop_last is None else bool(drop_last)
    rank, world = _dist_info(distributed)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device}: CUDA is not available on this machine")
    plan = augment_plan(augment, train, int(meta["resolution"]), int(resolution))
    common = dict(batch_size=batch_size, plan=plan, seed=seed, rank=rank, world_size=world, shuffle=shuffle,
                  drop_last=drop_last, device=device, channels_last=channels_last, return_indices=return_indices,
                  subset=subset)
    key = None
    if reuse:
        files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in (data_dir / f"{file}.beton",
                                                                              data_dir / "meta.json"))
        key = (str(data_dir.resolve()), files, split, backend, num_workers, str(device), holdout, holdout_seed,
               *sorted((k, str(v)) for k, v in common.items() if k != "subset"))
        if key in _REUSABLE:
            _REUSABLE.move_to_end(key)
            loader = _REUSABLE[key]
            loader.set_window(None)
            return loader
    if backend == "ffcv":
        loader = FFCVLoader(data_dir, file, meta, num_workers=max(1, num_workers), **common)
    else:
        loader = TorchLoader(data_dir, file, meta, num_workers=num_workers, **common)
    if key is not None:
        _REUSABLE[key] = loader
        while len(_REUSABLE) > _REUSABLE_MAX:
            _REUSABLE.popitem(last=False)
    return loader


def split_tensors(data_dir: str | Path, split: str, *, resolution: int, augment: str = "none", backend: str = "ffcv",
                  device="cpu", holdout: float = 0, holdout_seed: int = 0,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A small evaluation split ("val", "holdout"), whole, as (images float32 NCHW normalised, labels
    int64) on `device`, in order and as evaluation serves it (the holdout a search scores sub-networks on)."""
    if split == "train":
        raise BadValue("split", "train: split_tensors serves evaluation splits (val, holdout), which are small")
    loader = make_loader(data_dir, split, batch_size=batch_size, resolution=resolution, augment=augment,
                         backend=backend, num_workers=1, shuffle=False, drop_last=False, device=device,
                         holdout=holdout, holdout_seed=holdout_seed)
    images, labels = zip(*((x, y) for x, y in loader))
    return torch.cat(images), torch.cat(labels)
