"""FFCV pipeline operations whose randomness is a function of (seed, epoch, sample index).

FFCV 1.0.2's own RandomTranslate / RandomHorizontalFlip / RandomResizedCrop draw from numba's
per-thread generator, which cannot be seeded reproducibly across its parallel threads. These ops
take the sample ids of the batch (`with_indices`) and ask `kesi_dist.data.augment` instead.

The epoch must change without recompiling the pipeline. Numba freezes captured arrays as
constants, so the current epoch lives in an `EpochCell` (a one-element int64 array owned by the
loader) and the compiled code reads it through its address.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from numba import types
from numba.extending import intrinsic

from kesi_dist.data.augment import (
    center_crop_box,
    flip_decision,
    random_resized_crop_box,
    translate_offsets,
)

__all__ = ["EpochCell", "SeededTranslate", "SeededFlip", "CropResizeDecoder"]


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


class SeededTranslate(Operation):
    """Pad by `padding` zeros on every side and take a random crop of the original size (uint8 NHWC)."""

    def __init__(self, padding: int, seed: int, cell: EpochCell):
        super().__init__()
        self.padding, self.seed, self.cell = int(padding), int(seed), cell

    def generate_code(self):
        my_range = Compiler.get_iterator()
        pad, seed, addr = self.padding, self.seed, self.cell.address

        def translate(images, dst, indices):
            epoch = _load_int64(addr)
            n, h, w, _ = images.shape
            for i in my_range(n):
                dy, dx = translate_offsets(seed, epoch, indices[i], pad)
                # Output pixel (y, x) is padded pixel (y + dy, x + dx) = source (y + dy - pad, x + dx - pad).
                sy, sx = dy - pad, dx - pad
                dst[i] = 0
                y0, y1 = max(0, -sy), min(h, h - sy)
                x0, x1 = max(0, -sx), min(w, w - sx)
                dst[i, y0:y1, x0:x1] = images[i, y0 + sy:y1 + sy, x0 + sx:x1 + sx]
            return dst[:n]

        translate.is_parallel = True
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
        my_range = Compiler.get_iterator()
        seed, addr = self.seed, self.cell.address

        def flip(images, dst, indices):
            epoch = _load_int64(addr)
            n = images.shape[0]
            for i in my_range(n):
                if flip_decision(seed, epoch, indices[i]):
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst[:n]

        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class CropResizeDecoder(ResizedCropRGBImageDecoder):
    """Decode, crop a box, resize it to `size` x `size` (FFCV's INTER_AREA resize) in one pass.

    mode: "random" (torchvision RandomResizedCrop box from (seed, epoch, index)), "center"
    (central square of `center_ratio` * short side) or "full" (the whole image, i.e. a resize).
    """

    def __init__(self, size: int, mode: str, seed: int = 0, cell: EpochCell | None = None,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), center_ratio: float = 0.875):
        super().__init__((int(size), int(size)))
        if mode not in ("random", "center", "full"):
            raise ValueError(f"mode must be random, center or full, got {mode!r}")
        self.mode, self.seed = mode, int(seed)
        self.cell = cell or EpochCell()
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.center_ratio = 1.0 if mode == "full" else float(center_ratio)

    @property
    def get_crop_generator(self):  # required by the abstract base; unused (generate_code is ours)
        return None

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        is_random = self.mode == "random"
        seed, addr = self.seed, self.cell.address
        s_lo, s_hi = self.scale
        r_lo, r_hi = self.ratio
        c_ratio = self.center_ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = _load_int64(addr)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                if is_random:
                    i, j, h, w = random_resized_crop_box(
                        seed, epoch, source_ix, int(height), int(width), s_lo, s_hi, r_lo, r_hi
                    )
                else:
                    i, j, h, w = center_crop_box(int(height), int(width), c_ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
