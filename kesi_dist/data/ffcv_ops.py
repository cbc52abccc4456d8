"""FFCV pipeline operations whose randomness is a function of (seed, epoch, sample index).

FFCV 1.0.2's own RandomTranslate / RandomHorizontalFlip / RandomResizedCrop draw from numba's
per-thread generator, which cannot be seeded reproducibly across its parallel threads. These ops
take the sample ids of the batch (`with_indices`) and ask `kesi_dist.data.augment` instead.

The epoch must change without recompiling the pipeline. Numba freezes captured arrays as
constants, so the current epoch lives in an `EpochCell` (a one-element int64 array owned by the
loader) and the compiled code reads it through its address.

FFCV compiles every operation's code afresh for each Loader, and numba's parallel (prange)
compilation takes seconds. So the work is done by module-level kernels, compiled once per process
(and cached on disk where they call no C library), and each op's per-loader code is a thin
wrapper that passes its constants to the kernel.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from numba import njit, prange, types
from numba.extending import intrinsic

from kesi_dist.data.augment import (
    center_crop_box,
    flip_decision,
    random_resized_crop_box,
    translate_offsets,
)

__all__ = ["EpochCell", "SeededTranslate", "SeededFlip", "CropResizeDecoder", "NormalizeCHW"]


@intrinsic
def _load_int64(typingctx, address):
    """Read the int64 stored at an integer address (the loader keeps the memory alive)."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
        return builder.load_atomic(ptr, "monotonic", 8)

    return sig, codegen


class EpochCell:
    """The epoch seen by compiled ops; `set()` between epochs, never while one is being read."""

    def __init__(self, epoch: int = 0):
        self._value = np.array([epoch], dtype=np.int64)
        self.address = np.uint64(self._value.ctypes.data)

    def set(self, epoch: int) -> None:
        self._value[0] = epoch

    def get(self) -> int:
        return int(self._value[0])



_JPG = IMAGE_MODES["jpg"]
# The C functions are called through ctypes directly: wrapping them in extra numba dispatchers (as
# ffcv.libffcv does) made numba's dispatcher finalizers race with compilation in FFCV's thread.
STORED, BOX, RANDOM = 0, 1, 2


@njit(nogil=True, parallel=True, cache=True)
def _translate_kernel(images, dst, indices, seed, epoch, pad):
    n, h, w, _ = images.shape
    for i in prange(n):
        dy, dx = translate_offsets(seed, epoch, indices[i], pad)
        # Output pixel (y, x) is padded pixel (y + dy, x + dx) = source (y + dy - pad, x + dx - pad).
        sy, sx = dy - pad, dx - pad
        dst[i] = 0
        y0, y1 = max(0, -sy), min(h, h - sy)
        x0, x1 = max(0, -sx), min(w, w - sx)
        dst[i, y0:y1, x0:x1] = images[i, y0 + sy:y1 + sy, x0 + sx:x1 + sx]
    return dst[:n]


@njit(nogil=True, parallel=True, cache=True)
def _flip_kernel(images, dst, indices, seed, epoch):
    n = images.shape[0]
    for i in prange(n):
        if flip_decision(seed, epoch, indices[i]):
            dst[i] = images[i, :, ::-1]
        else:
            dst[i] = images[i]
    return dst[:n]


@njit(nogil=True, parallel=True)
def _decode_kernel(batch_indices, destination, temp_storage, metadata, storage_state, mode, seed, epoch,
                   s_lo, s_hi, r_lo, r_hi, c_ratio):
    mmap, ptrs, sizes = storage_state  # FFCV's OS-cache state: the mapped file and its allocation table
    for k in prange(len(batch_indices)):
        sid = batch_indices[k]
        field = metadata[sid]
        address = field["data_ptr"]
        size = sizes[np.searchsorted(ptrs, address)]
        data = mmap[address:address + size]
        height = np.uint32(field["height"])
        width = np.uint32(field["width"])
        if mode == STORED:  # all images have the output size (checked by the loader)
            if field["mode"] == _JPG:
                ctypes_imdecode(data.ctypes.data, data.size, height, width, destination[k].ctypes.data,
                                height, width, 0, 0, 1, 1, False, False)
            else:
                destination[k].reshape(-1)[:] = data[:3 * height * width]
            continue
        if field["mode"] == _JPG:
            buf = temp_storage[k]
            ctypes_imdecode(data.ctypes.data, data.size, height, width, buf.ctypes.data,
                            height, width, 0, 0, 1, 1, False, False)
            image = buf.reshape(-1)[:3 * height * width].reshape(height, width, 3)
        else:
            image = data[:3 * height * width].reshape(height, width, 3)
        if mode == RANDOM:
            i, j, h, w = random_resized_crop_box(seed, epoch, sid, int(height), int(width), s_lo, s_hi, r_lo, r_hi)
        else:
            i, j, h, w = center_crop_box(int(height), int(width), c_ratio)
        out = destination[k]
        ctypes_resize(0, image.ctypes.data, image.shape[0], image.shape[1], i, i + h, j, j + w,
                      out.ctypes.data, out.shape[0], out.shape[1])
    return destination[:len(batch_indices)]


@njit(nogil=True, parallel=True, cache=True, fastmath=True)
def _normalize_kernel(images, dst, scale, shift, nhwc_out):
    # (pixel - mean) / std == pixel * scale + shift; uint8 NHWC in, float32 NCHW (or NHWC) out, one pass.
    n, h, w, c = images.shape
    for i in prange(n):
        for y in range(h):
            for x in range(w):
                for ch in range(c):
                    v = np.float32(images[i, y, x, ch]) * scale[ch] + shift[ch]
                    if nhwc_out:
                        dst[i, y, x, ch] = v
                    else:
                        dst[i, ch, y, x] = v
    return dst[:n]


class NormalizeCHW(Operation):
    """uint8 NHWC -> float32 `(x - mean) / std`, laid out NCHW (or NHWC, for channels_last).

    The CPU path's last jitted op: torch needs ~5x longer for the same strided conversion.
    """

    def __init__(self, mean, std, channels_last: bool = False):
        super().__init__()
        std = np.asarray(std, dtype=np.float32)
        self.scale = (1.0 / std).astype(np.float32)
        self.shift = (-np.asarray(mean, dtype=np.float32) / std).astype(np.float32)
        self.channels_last = bool(channels_last)

    def generate_code(self):
        scale, shift, nhwc = self.scale, self.shift, self.channels_last

        def normalize(images, dst):
            return _normalize_kernel(images, dst, scale, shift, nhwc)

        return normalize

    def declare_state_and_memory(self, previous_state):
        h, w, c = previous_state.shape
        shape = (h, w, c) if self.channels_last else (c, h, w)
        dtype = np.dtype("<f4")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)


class SeededTranslate(Operation):
    """Pad by `padding` zeros on every side and take a random crop of the original size (uint8 NHWC)."""

    def __init__(self, padding: int, seed: int, cell: EpochCell):
        super().__init__()
        self.padding, self.seed, self.cell = int(padding), int(seed), cell

    def generate_code(self):
        pad, seed, addr = self.padding, self.seed, self.cell.address

        def translate(images, dst, indices):
            return _translate_kernel(images, dst, indices, seed, _load_int64(addr), pad)

        translate.with_indices = True
        return translate

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class SeededFlip(Operation):
    """Horizontal flip with probability 0.5 (uint8 NHWC)."""

    def __init__(self, seed: int, cell: EpochCell):
        super().__init__()
        self.seed, self.cell = int(seed), cell

    def generate_code(self):
        seed, addr = self.seed, self.cell.address

        def flip(images, dst, indices):
            return _flip_kernel(images, dst, indices, seed, _load_int64(addr))

        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class CropResizeDecoder(ResizedCropRGBImageDecoder):
    """Decode to `size` x `size`, cropping and resizing (FFCV's INTER_AREA resize) in the same pass.

    mode: "stored" (images already `size`: copy or JPEG-decode only), "random" (torchvision
    RandomResizedCrop box from (seed, epoch, index)), "center" (central square of
    `center_ratio` x the short side) or "full" (the whole image, i.e. a resize). Needs FFCV's OS
    cache memory manager (`os_cache=True`), whose state the kernel reads directly.
    """

    def __init__(self, size: int, mode: str, seed: int = 0, cell: EpochCell | None = None,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), center_ratio: float = 0.875):
        super().__init__((int(size), int(size)))
        if mode not in ("stored", "random", "center", "full"):
            raise ValueError(f"mode must be stored, random, center or full, got {mode!r}")
        self.mode, self.seed = mode, int(seed)
        self.cell = cell or EpochCell()
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.center_ratio = 1.0 if mode == "full" else float(center_ratio)

    @property
    def get_crop_generator(self):  # required by the abstract base; unused (generate_code is ours)
        return None

    def generate_code(self):
        mode = {"stored": STORED, "random": RANDOM}.get(self.mode, BOX)
        seed, addr = self.seed, self.cell.address
        s_lo, s_hi = self.scale
        r_lo, r_hi = self.ratio
        c_ratio = self.center_ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            return _decode_kernel(batch_indices, my_storage[0], my_storage[1], metadata, storage_state, mode, seed,
                                  _load_int64(addr), s_lo, s_hi, r_lo, r_hi, c_ratio)

        return decode
