"""Random access to the samples of a `.beton` file without FFCV's compiled Loader.

Used by the torch `DataLoader` backend, by `prepare` to compute channel statistics, and by tests.
It parses the file with FFCV's `Reader` (header, metadata, allocation table) and decodes with the
same C helpers FFCV's pipeline calls, so pixels match the FFCV backend exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import imdecode, resize_crop
from ffcv.reader import Reader

from kesi_dist.errors import RunError

__all__ = ["BetonFile", "resize_box"]

_JPG = IMAGE_MODES["jpg"]


def resize_box(image: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """Crop `image[top:top+h, left:left+w]` and resize it to size x size like FFCV's decoders."""
    out = np.empty((size, size, 3), dtype=np.uint8)
    resize_crop(np.ascontiguousarray(image), top, top + h, left, left + w, out)
    return out


class BetonFile:
    """Read-only view of a kesi `.beton` (fields `image`, `label`, `index`).

    The file is memory-mapped lazily so the object can be sent to DataLoader worker processes.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            reader = Reader(self.path)
        except (OSError, AssertionError, ValueError, IndexError) as e:
            raise RunError(f"{self.path}: not a readable .beton file ({e}); re-run `kesi data prepare`") from None
        if "image" not in reader.handlers or "label" not in reader.handlers:
            raise RunError(f"{self.path}: expected fields image and label, found {', '.join(reader.field_names)}")
        self.num_samples = int(reader.num_samples)
        # Metadata columns are unnamed (f0, f1, ...) in field order.
        col = {name: reader.metadata.dtype.names[i] for i, name in enumerate(reader.field_names)}
        self.image_meta = np.array(reader.metadata[col["image"]])
        self.labels = np.array(reader.metadata[col["label"]], dtype=np.int64).reshape(-1)
        self.indices = (np.array(reader.metadata[col["index"]], dtype=np.int64).reshape(-1)
                        if "index" in col else np.arange(self.num_samples, dtype=np.int64))
        alloc = reader.alloc_table
        order = np.argsort(alloc["ptr"])
        self._ptrs = np.array(alloc["ptr"][order], dtype=np.uint64)
        self._sizes = np.array(alloc["size"][order], dtype=np.uint64)
        self._mmap: np.memmap | None = None

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mmap"] = None  # each process maps the file itself
        return state

    def _data(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def image(self, i: int) -> np.ndarray:
        """The stored image `i` as uint8 HWC (decoded if stored as JPEG)."""
        meta = self.image_meta[i]
        h, w, ptr = int(meta["height"]), int(meta["width"]), np.uint64(meta["data_ptr"])
        data = self._data()
        if meta["mode"] == _JPG:
            pos = int(np.searchsorted(self._ptrs, ptr))
            size = int(self._sizes[pos])
            buf = np.ascontiguousarray(data[int(ptr): int(ptr) + size])
            out = np.empty((h, w, 3), dtype=np.uint8)
            imdecode(buf, out, h, w, h, w, 0, 0, 1, 1, False, False)
            return out
        return np.array(data[int(ptr): int(ptr) + h * w * 3]).reshape(h, w, 3)

    def channel_stats(self, max_samples: int = 20000, seed: int = 0) -> tuple[list[float], list[float]]:
        """Per-channel mean and std on the 0-255 scale, over all samples or a fixed random subset."""
        n = self.num_samples
        idx = np.arange(n) if n <= max_samples else np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
        total = np.zeros(3)
        total_sq = np.zeros(3)
        count = 0
        for i in idx:
            px = self.image(int(i)).reshape(-1, 3).astype(np.float64)
            total += px.sum(0)
            total_sq += (px * px).sum(0)
            count += px.shape[0]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
        return [round(float(m), 4) for m in mean], [round(float(max(s, 1e-3)), 4) for s in std]
