"""`kesi data prepare`: convert a source once into `train.beton`, `val.beton` and `meta.json`.

Every `.beton` holds three fields: `image` (RGB, square, `meta["resolution"]` pixels a side),
`label` (int) and `index` (the sample's position in its split, used to key augmentation and
cached soft labels). Images up to 128 px are stored raw (decoding is a memcpy, which is what makes
FFCV fast on small images); larger ones as JPEG, quality 90.

`meta.json` is written last, atomically: its presence means the dataset is complete. `mean` and
`std` are per channel (R, G, B) on the 0-255 pixel scale, computed on the training split (over a
fixed subset of 20,000 images when larger); the loaders compute `(pixel - mean) / std`.
Re-running with the same fingerprint (source, options, stored resolution and the identity of the
input files) returns the existing meta without touching anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kesi_dist import storage
from kesi_dist.data.sources import open_source
from kesi_dist.data.splits import SampleError, SourceData
from kesi_dist.errors import RunError, UsageError
from kesi_dist.storage.atomic import atomic_path, atomic_write_text

__all__ = ["DataSpec", "prepare_data", "prepare_dataset", "dataset_fingerprint", "FORMAT_VERSION", "RAW_MAX_SIDE"]

FORMAT_VERSION = 1
RAW_MAX_SIDE = 128  # images up to this side are stored uncompressed
_STATS_SAMPLES = 20000


def dataset_fingerprint(data: SourceData, options: dict) -> str:
    """sha256 over what determines the written files: format, source, options, side, input identity."""
    doc = {"format": FORMAT_VERSION, "source": data.source, "resolution": data.resolution,
           "options": options, "identity": data.identity}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class _Guarded:
    """Wraps a split for FFCV's writer processes: a bad sample is logged to `errors_path` and replaced
    by a black image, because an exception inside FFCV's writer workers would hang the writer."""

    def __init__(self, split, errors_path: str):
        self.split, self.errors_path, self.side = split, errors_path, split.resolution

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            img, label, idx = self.split[i]
            if img.dtype != np.uint8 or img.shape != (self.side, self.side, 3):
                raise SampleError(f"sample {i}: reader returned {img.dtype} {img.shape}, expected uint8 "
                                  f"({self.side}, {self.side}, 3)")
            return img, int(label), int(idx)
        except Exception as e:  # noqa: BLE001 - every failure must be reported, not hang the writer
            msg = str(e) if isinstance(e, SampleError) else f"sample {i}: {type(e).__name__}: {e}"
            with open(self.errors_path, "a") as f:
                f.write(msg.replace("\n", " ") + "\n")
            return np.zeros((self.side, self.side, 3), np.uint8), 0, int(i)


def _write_beton(split, path: Path, errors_path: Path, write_mode: str, workers: int, label: str) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    print(f"writing {label} ({len(split)} images) -> {path.parent}", file=sys.stderr, flush=True)
    writer = DatasetWriter(
        str(path),
        {"image": RGBImageField(write_mode=write_mode, jpeg_quality=90), "label": IntField(), "index": IntField()},
        num_workers=workers,
        page_size=1 << 21,  # FFCV's minimum; larger pages only waste space on small datasets
    )
    import functools

    import ffcv.writer
    import tqdm

    # FFCV's writer shows a tqdm bar; keep it on a terminal (with the split's name), out of logs:
    # tqdm's disable=None turns itself off when stderr is not a TTY. (KESI_PROGRESS=0/1 as elsewhere.)
    flag = os.environ.get("KESI_PROGRESS", "")
    shown = functools.partial(tqdm.tqdm, desc=label, unit="img", disable={"0": True, "1": False}.get(flag))
    original, ffcv.writer.tqdm = ffcv.writer.tqdm, shown
    try:
        writer.from_indexed_dataset(_Guarded(split, str(errors_path)), chunksize=100)
    finally:
        ffcv.writer.tqdm = original


def _read_existing(meta_path: Path) -> dict | None:
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None


def _prepare_remote(out: str, fingerprint: str, prepare: Callable[[str], dict]) -> dict:
    """`out` is a storage URI: prepare into a local temp folder, then upload the .beton files and
    meta.json last (the folder looks complete only when it is). Kept as is when the dataset there
    already has this fingerprint."""
    from kesi_dist.data.loaders import read_meta

    try:
        there = read_meta(out)
    except RunError:
        there = None
    if there is not None and there.get("fingerprint") == fingerprint:
        print(f"{out}: up to date (fingerprint {fingerprint[:12]}), nothing to do", file=sys.stderr)
        return there
    with tempfile.TemporaryDirectory(prefix="kesi-prepare-") as tmp:
        meta = prepare(tmp)
        storage.remove(storage.join(out, "meta.json"))  # from here on the folder does not look complete
        for name in ("train.beton", "val.beton", "meta.json"):
            print(f"uploading {name} -> {out}", file=sys.stderr, flush=True)
            storage.upload_file(Path(tmp) / name, storage.join(out, name))
    return meta


def prepare_dataset(source: str, root: str | None, out: str | Path, resolution: int | None = None, seed: int = 0,
                    *, workers: int | None = None, **source_options) -> dict:
    """Convert `source` into `out/{train,val}.beton` + `out/meta.json` and return the meta dict.

    Args:
        source: one of cifar10, cifar100, tiny-imagenet, imagefolder, digits, synthetic.
        root: the folder torchvision would take (unused for digits and synthetic).
        out: output folder, created if needed, or a storage URI (s3://, gs://, file://; prepared in a
            local temp folder, then uploaded).
        resolution: stored side; default the source's own (32 CIFAR/digits/synthetic, 64
            Tiny-ImageNet, first training image's shorter side for imagefolder).
        seed: synthetic generator seed (other sources are deterministic).
        workers: writer processes (default: all CPUs, at most 8).
        **source_options: synthetic: num_train, num_val, num_classes, difficulty.

    Raises:
        UsageError: unknown source, missing --root, bad option.
        RunError: missing or malformed input; the message names the file. Nothing that looks
            complete (meta.json) is left behind.
    """
    remote = storage.is_uri(out)
    out = out if remote else Path(out)
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: must be >= 1")
    data = open_source(source, root, resolution=resolution, seed=seed, **source_options)
    options = dict(sorted(source_options.items()))
    if source == "synthetic":
        options["seed"] = int(seed)
    fingerprint = dataset_fingerprint(data, options)
    if remote:
        return _prepare_remote(out, fingerprint, lambda local: prepare_dataset(
            source, root, local, resolution, seed, workers=workers, **source_options))
    meta_path = out / "meta.json"
    existing = _read_existing(meta_path) if meta_path.is_file() else None
    if (existing and existing.get("fingerprint") == fingerprint
            and (out / "train.beton").is_file() and (out / "val.beton").is_file()):
        print(f"{out}: up to date (fingerprint {fingerprint[:12]}), nothing to do", file=sys.stderr)
        return existing

    for name, split in (("train", data.train), ("val", data.val)):
        if len(split) == 0:
            raise RunError(f"{root or source}: the {name} split is empty")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{out}: cannot create output folder ({e.strerror})") from None

    workers = workers or min(os.cpu_count() or 1, 8)
    write_mode = "raw" if data.resolution <= RAW_MAX_SIDE else "jpg"
    tag = f"{os.getpid()}-{time.time_ns()}"
    errors_path = out / f".prepare-errors.{tag}.txt"
    try:
        # Both files under temp names until both are written and read back; meta.json comes last.
        with atomic_path(out / "train.beton") as train_tmp, atomic_path(out / "val.beton") as val_tmp:
            tmp = {"train": train_tmp, "val": val_tmp}
            for name, split in (("train", data.train), ("val", data.val)):
                _write_beton(split, tmp[name], errors_path, write_mode, workers, f"{name}.beton")
                if errors_path.exists():
                    lines = errors_path.read_text().splitlines()
                    more = f" (and {len(lines) - 1} more bad samples)" if len(lines) > 1 else ""
                    raise RunError(f"{lines[0]}{more}; fix or remove the file and re-run")
            from kesi_dist.data.beton import BetonFile

            mean, std = BetonFile(tmp["train"]).channel_stats(max_samples=_STATS_SAMPLES, seed=0)
            sizes = {f"{name}.beton": tmp[name].stat().st_size for name in ("train", "val")}
            # A previous dataset stays complete and usable until here; from the renames on, the folder
            # does not look complete until the new meta.json is written.
            meta_path.unlink(missing_ok=True)
        meta = {
            "format": FORMAT_VERSION,
            "source": data.source,
            "root": str(Path(root).resolve()) if root else None,
            "num_classes": len(data.class_names),
            "train_size": len(data.train),
            "val_size": len(data.val),
            "resolution": data.resolution,
            "mean": mean,
            "std": std,
            "pixel_scale": "0-255",
            "class_names": list(data.class_names),
            "fingerprint": fingerprint,
            "options": options,
            "write_mode": write_mode,
            "fields": ["image", "label", "index"],
            "bytes": sizes,  # a reader refuses a .beton of another size (truncated, or half copied)
            **data.extra_meta,
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
        return meta
    finally:
        errors_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class DataSpec:
    """A run's data: a raw `source` to convert once (into `prepared`, or a default folder), or an
    already prepared folder (`source` "prepared"). `options`: the synthetic generator's."""

    source: str
    root: str | None = None
    prepared: str | None = None
    store_resolution: int | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)


def prepare_data(spec: DataSpec, default_dir: str | Path) -> tuple[str, dict]:
    """The prepared data folder of `spec` and its meta, converting a raw source first when needed.

    The folder may be a storage URI (prepared locally and uploaded); loaders fetch it into a node-local
    cache (`kesi_dist.storage.local_copy`): FFCV memory-maps local files.
    """
    from kesi_dist.data.loaders import read_meta

    if spec.source == "prepared":
        return str(spec.prepared), read_meta(spec.prepared)
    out = str(spec.prepared or default_dir)
    return out, prepare_dataset(spec.source, spec.root, out, resolution=spec.store_resolution, seed=spec.seed,
                                **spec.options)
