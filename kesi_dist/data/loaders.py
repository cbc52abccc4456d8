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
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kesi_dist.data.augment import (
    CENTER_CROP_RATIO,
    RRC_RATIO,
    RRC_SCALE,
    center_crop_box,
    epoch_order,
    flip_decision,
    random_resized_crop_box,
    translate_offsets,
)
from kesi_dist import storage
from kesi_dist.errors import RunError, UsageError

__all__ = ["read_meta", "make_loader", "ImageLoader", "AUGMENTS", "BACKENDS", "SPLITS", "CIFAR_PAD"]

AUGMENTS = ("cifar", "imagenet", "none")
BACKENDS = ("ffcv", "torch")
SPLITS = ("train", "val")
CIFAR_PAD = 4
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


@dataclass(frozen=True)
class _Plan:
    """Per-sample pixel pipeline: decode ("stored" | "full" | "center" | "random") to `size`, then
    optional pad-and-crop (`pad` > 0) and flip."""

    decode: str
    size: int
    pad: int
    flip: bool


def _plan(augment: str, train: bool, stored: int, resolution: int) -> _Plan:
    if augment == "imagenet":
        return _Plan("random", resolution, 0, True) if train else _Plan("center", resolution, 0, False)
    decode = "stored" if resolution == stored else "full"
    if augment == "cifar" and train:
        return _Plan(decode, resolution, CIFAR_PAD, True)
    return _Plan(decode, resolution, 0, False)


def _dist_info(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("make_loader(distributed=True) needs torch.distributed initialised first "
                         "(Ray Train workers do this; otherwise call torch.distributed.init_process_group)")
    return dist.get_rank(), dist.get_world_size()


class ImageLoader:
    """Common part of both backends: sharding, epochs, normalisation. Iterate to get
    `(images float32 NCHW on device, labels int64 [B])`, plus `indices int64 [B]` (position in the
    split) when built with `return_indices=True`."""

    def __init__(self, data_dir: Path, split: str, meta: dict, *, batch_size: int, plan: _Plan, seed: int,
                 rank: int, world_size: int, shuffle: bool, drop_last: bool, device: torch.device,
                 channels_last: bool, return_indices: bool):
        self.data_dir, self.split, self.meta, self.plan = data_dir, split, meta, plan
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle, self.drop_last, self.device = shuffle, drop_last, device
        self.channels_last, self.return_indices = channels_last, return_indices
        self.split_size = int(meta[f"{split}_size"])
        self.window: tuple[int, int] | None = None
        self.num_samples = len(self.order(0))  # this rank's samples per epoch
        self.resolution = plan.size
        self.num_classes = int(meta["num_classes"])
        self._next_epoch = 0
        self.epoch = 0
        self._mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1).to(device)
        self._std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1).to(device)

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices (positions in the split) this rank visits in `epoch`, in order."""
        order = epoch_order(self.split_size, seed=self.seed, epoch=epoch, shuffle=self.shuffle, rank=self.rank,
                            world_size=self.world_size, drop_last=self.drop_last)
        return order if self.window is None else order[self.window[0]:self.window[1]]

    def set_window(self, start: int | None, stop: int | None = None) -> None:
        """Visit only positions `start:stop` of each epoch's order (None: all of it).

        Lets several processes split one epoch's work without each reading the whole epoch: with
        both ends multiples of batch_size, the batches are exactly those of the full epoch.
        """
        self.window = None if start is None else (int(start), int(self.num_samples if stop is None else stop))

    def set_epoch(self, epoch: int) -> None:
        """The next iteration replays epoch `epoch` (order and augmentation)."""
        self._next_epoch = int(epoch)

    def __len__(self) -> int:
        n = self.num_samples if self.window is None else len(range(self.num_samples)[slice(*self.window)])
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _start_epoch(self) -> int:
        self.epoch = self._next_epoch
        self._next_epoch += 1
        return self.epoch

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None, nhwc: bool = True):
        """uint8 NHWC (or NCHW, already on the GPU) -> normalised float32 NCHW on `device`.

        Float input is already normalised (FFCV's CPU path); it is copied out of FFCV's reused buffers.
        """
        if nhwc:
            images = images.permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if images.dtype == torch.float32:
            images = images.clone(memory_format=fmt)
        else:
            images = images.to(self.device, non_blocking=True).float()
            images = (images - self._mean) / self._std
            images = images.contiguous(memory_format=fmt)
        # FFCV hands out views of buffers it reuses a few batches later: labels/indices get their own memory.
        labels = labels.to(self.device, dtype=torch.int64, non_blocking=True, copy=True).view(-1)
        if self.return_indices:
            return images, labels, indices.to(self.device, dtype=torch.int64, non_blocking=True, copy=True).view(-1)
        return images, labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.data_dir}/{self.split}, batches={len(self)}, batch_size={self.batch_size}, "
                f"rank={self.rank}/{self.world_size}, resolution={self.resolution}, plan={self.plan})")


# -------------------------------------------------------------------------------------------------
# FFCV backend

class FFCVLoader(ImageLoader):
    normalise_in_pipeline = True  # CPU: numba kernel (NormalizeCHW) instead of torch ops in the consumer

    def __init__(self, *args, num_workers: int, **kwargs):
        super().__init__(*args, **kwargs)
        import numba
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.traversal_order.base import TraversalOrder
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        from kesi_dist.data.ffcv_ops import CropResizeDecoder, EpochCell, NormalizeCHW, SeededFlip, SeededTranslate

        # numba cannot run more threads than it was started with (default: the CPU count).
        threads = max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))
        self.cell = EpochCell(0)
        p, seed = self.plan, self.seed
        image_ops = [CropResizeDecoder(p.size, p.decode, seed, self.cell, RRC_SCALE, RRC_RATIO, CENTER_CROP_RATIO)]
        if p.pad:
            image_ops.append(SeededTranslate(p.pad, seed, self.cell))
        if p.flip:
            image_ops.append(SeededFlip(seed, self.cell))
        self._on_gpu = self.device.type == "cuda" and torch.cuda.is_available()
        if not self._on_gpu and self.normalise_in_pipeline:  # GPU: uint8 crosses the bus, normalised there
            image_ops.append(NormalizeCHW(self.meta["mean"], self.meta["std"], self.channels_last))
        image_ops.append(ToTensor())  # every jitted op stays before ToTensor (see FFCV notes)
        label_ops = [IntDecoder(), ToTensor(), Squeeze()]
        index_ops = [IntDecoder(), ToTensor(), Squeeze()] if self.return_indices else None
        if self._on_gpu:
            image_ops += [ToDevice(self.device, non_blocking=True), ToTorchImage(channels_last=self.channels_last)]
            label_ops.append(ToDevice(self.device, non_blocking=True))
            if index_ops:
                index_ops.append(ToDevice(self.device, non_blocking=True))

        self._loader = Loader(
            str(self.data_dir / f"{self.split}.beton"), batch_size=self.batch_size, num_workers=threads,
            os_cache=True, order=OrderOption.SEQUENTIAL, seed=seed, drop_last=self.drop_last,
            pipelines={"image": image_ops, "label": label_ops, "index": index_ops},
        )
        if self._loader.reader.num_samples != self.split_size:
            raise RunError(f"{self.data_dir / (self.split + '.beton')}: holds {self._loader.reader.num_samples} "
                           f"samples but meta.json says {self.split_size}; re-run `kesi data prepare`")
        reader = self._loader.reader
        sides = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
        if p.decode == "stored" and not (np.all(sides["height"] == p.size) and np.all(sides["width"] == p.size)):
            raise RunError(f"{self.data_dir / (self.split + '.beton')}: images are not all {p.size}x{p.size} as "
                           "meta.json says; re-run `kesi data prepare`")
        outer = self

        class _ShardOrder(TraversalOrder):  # FFCV's own orders pad shards (DistributedSampler)
            def sample_order(self, epoch: int):
                return outer.order(epoch)

        self._loader.traversal_order = _ShardOrder(self._loader)
        self._loader.first_traversal_order = self._loader.traversal_order.sample_order(0)
        self._it = None

    def __iter__(self):
        if self._it is not None:
            self._it.close()  # an abandoned previous epoch must stop before the cell changes
        epoch = self._start_epoch()
        self.cell.set(epoch)
        self._it = _epoch_iterator(self._loader, epoch, len(self) * self.batch_size)
        for batch in self._it:
            # CPU: NormalizeCHW already produced NCHW (or NHWC if channels_last); GPU: ToTorchImage did.
            nhwc = not self._on_gpu and (self.channels_last or not self.normalise_in_pipeline)
            yield self._finish(batch[0], batch[1], batch[2] if self.return_indices else None, nhwc=nhwc)
        self._it = None


@functools.cache
def _checked_iterator_class():
    from ffcv.loader.epoch_iterator import EpochIterator

    class CheckedEpochIterator(EpochIterator):
        error: BaseException | None = None

        def run(self):
            try:
                super().run()
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread
                self.error = e
                self.output_queue.put(None)

        def __next__(self):
            try:
                return super().__next__()
            except StopIteration:
                if self.error is not None:
                    raise RunError(f"{self.loader.fname}: FFCV pipeline failed: {type(self.error).__name__}: "
                                   f"{self.error}") from self.error
                raise

    return CheckedEpochIterator


def _epoch_iterator(loader, epoch: int, samples: int):
    """FFCV's `Loader.__iter__` for `epoch`, with an iterator whose worker-thread errors reach the caller.

    FFCV's own EpochIterator thread dies silently on an exception and leaves the consumer blocked
    on its queue forever.
    """
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_num_threads(loader.num_workers)
    loader.next_epoch = epoch
    order = loader.next_traversal_order()
    loader.next_epoch = epoch + 1
    if loader.code is None or loader.recompile:
        loader.generate_code()
    return _checked_iterator_class()(loader, order[:samples])


# -------------------------------------------------------------------------------------------------
# torch backend

def apply_plan(image: np.ndarray, plan: _Plan, seed: int, epoch: int, index: int) -> np.ndarray:
    """The FFCV pipeline of `plan` for one uint8 HWC image, in numpy (the torch backend's transform)."""
    from kesi_dist.data.beton import resize_box

    h, w = image.shape[:2]
    if plan.decode == "random":
        box = random_resized_crop_box(seed, epoch, index, h, w, RRC_SCALE[0], RRC_SCALE[1], RRC_RATIO[0], RRC_RATIO[1])
        image = resize_box(image, *box, plan.size)
    elif plan.decode != "stored":
        ratio = CENTER_CROP_RATIO if plan.decode == "center" else 1.0
        image = resize_box(image, *center_crop_box(h, w, ratio), plan.size)
    if plan.pad:
        dy, dx = translate_offsets(seed, epoch, index, plan.pad)
        padded = np.pad(image, ((plan.pad, plan.pad), (plan.pad, plan.pad), (0, 0)))
        image = padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]
    if plan.flip and flip_decision(seed, epoch, index):
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


class _BetonDataset(torch.utils.data.Dataset):
    def __init__(self, path: Path, plan: _Plan, seed: int):
        from kesi_dist.data.beton import BetonFile

        self.file, self.plan, self.seed = BetonFile(path), plan, seed

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, item):
        i, epoch = item  # the sampler sends (sample, epoch) so workers need no epoch state
        img = apply_plan(self.file.image(i), self.plan, self.seed, epoch, i)
        return img, int(self.file.labels[i]), int(self.file.indices[i])


def _collate(samples):
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    indices = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return images, labels, indices


class _EpochBatches(torch.utils.data.Sampler):
    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        ld = self.loader
        order, bs, epoch = ld.order(ld.epoch), ld.batch_size, ld.epoch
        for b in range(len(ld)):
            yield [(int(i), epoch) for i in order[b * bs:(b + 1) * bs]]


class TorchLoader(ImageLoader):
    def __init__(self, *args, num_workers: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.dataset = _BetonDataset(self.data_dir / f"{self.split}.beton", self.plan, self.seed)
        if len(self.dataset) != self.split_size:
            raise RunError(f"{self.data_dir / (self.split + '.beton')}: holds {len(self.dataset)} samples but "
                           f"meta.json says {self.split_size}; re-run `kesi data prepare`")
        self._dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_EpochBatches(self), num_workers=num_workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda" and torch.cuda.is_available(),
        )

    def __iter__(self):
        self._start_epoch()
        for images, labels, indices in self._dl:
            yield self._finish(images, labels, indices)


# -------------------------------------------------------------------------------------------------

def make_loader(data_dir: str | Path, split: str, *, batch_size: int, resolution: int, augment: str = "cifar",
                backend: str = "ffcv", num_workers: int = 2, seed: int = 0, distributed: bool = False,
                shuffle: bool | None = None, drop_last: bool | None = None, device="cpu",
                channels_last: bool = False, return_indices: bool = False) -> ImageLoader:
    """A loader over `data_dir/{split}.beton`; see the module docstring for what it yields.

    Args:
        data_dir: a folder written by `prepare_dataset`, or its storage URI (copied once into the
            node-local cache, `kesi_dist.storage.local_copy`).
        split: "train" or "val".
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
    """
    if split not in SPLITS:
        raise UsageError(f"split {split!r}: must be one of {', '.join(SPLITS)}")
    if augment not in AUGMENTS:
        raise UsageError(f"data.augment {augment!r}: must be one of {', '.join(AUGMENTS)}")
    if backend not in BACKENDS:
        raise UsageError(f"data.loader {backend!r}: must be one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise UsageError(f"data.batch_size {batch_size}: must be >= 1")
    if not 8 <= resolution <= 1024:
        raise UsageError(f"data.resolution {resolution}: must be between 8 and 1024")
    if num_workers < 0:
        raise UsageError(f"data.num_workers {num_workers}: must be >= 0")
    data_dir = Path(storage.local_copy(data_dir))  # a URI is fetched once per node (FFCV maps local files)
    meta = read_meta(data_dir)
    train = split == "train"
    shuffle = train if shuffle is None else bool(shuffle)
    drop_last = train if drop_last is None else bool(drop_last)
    rank, world = _dist_info(distributed)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device}: CUDA is not available on this machine")
    plan = _plan(augment, train, int(meta["resolution"]), int(resolution))
    common = dict(batch_size=batch_size, plan=plan, seed=seed, rank=rank, world_size=world, shuffle=shuffle,
                  drop_last=drop_last, device=device, channels_last=channels_last, return_indices=return_indices)
    if backend == "ffcv":
        return FFCVLoader(data_dir, split, meta, num_workers=max(1, num_workers), **common)
    return TorchLoader(data_dir, split, meta, num_workers=num_workers, **common)
