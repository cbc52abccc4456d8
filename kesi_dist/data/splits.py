"""What a source reader returns: `SourceData` and its split types, plus helpers the readers share.

A split is indexable, `split[i] -> (uint8 HxWx3 image, label, i)`: `ArraySplit` holds images in
memory (CIFAR, digits), `FileSplit` decodes image files lazily with PIL (Tiny-ImageNet,
ImageFolder), so FFCV's writer processes do the work in parallel. `SampleError` names a sample
that cannot be read. The readers live in `kesi_dist.data.sources` (CIFAR, `open_source`) and
`kesi_dist.data.folders` (Tiny-ImageNet, ImageFolder, digits).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

__all__ = ["Split", "SourceData", "ArraySplit", "FileSplit", "SampleError", "files_identity", "file_digest"]


class SampleError(Exception):
    """A sample could not be read; `str()` names the file and the reason."""


class Split(Protocol):
    """What the writer consumes: `split[i] -> (uint8 HxWx3 image, label, i)`."""

    resolution: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]: ...


@dataclass
class SourceData:
    """A dataset ready to be written: two splits, class names, stored side, identity of the input."""

    source: str
    train: Any
    val: Any
    class_names: list[str]
    resolution: int
    identity: dict = field(default_factory=dict)
    extra_meta: dict = field(default_factory=dict)  # written to meta.json as is


def _to_square(img: Image.Image, size: int) -> np.ndarray:
    """RGB, shorter side resized to `size` (bilinear, antialiased), center-cropped to a square."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).copy()


class ArraySplit:
    """Images already in memory (uint8 NHWC), resized on access when `resolution` differs."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, resolution: int | None = None):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.resolution = int(resolution or images.shape[1])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        img = self.images[i]
        if img.shape[0] != self.resolution or img.shape[1] != self.resolution:
            img = _to_square(Image.fromarray(img), self.resolution)
        return np.ascontiguousarray(img), int(self.labels[i]), int(i)


class FileSplit:
    """Image files decoded with PIL on access; grayscale/paletted images become RGB."""

    def __init__(self, paths: list[str], labels: list[int], resolution: int):
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.resolution = int(resolution)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                arr = _to_square(img, self.resolution)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise SampleError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
        return arr, int(self.labels[i]), int(i)


def files_identity(paths: list[str], root: str) -> str:
    """Cheap identity of many files: relative path, size and mtime of each."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

