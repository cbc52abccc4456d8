"""The FFCV backend of `make_loader`: `FFCVLoader` over FFCV's compiled `Loader`.

On CPU the pipeline is decode -> crop/flip -> normalise to float32 NCHW (all numba, parallel over
`num_workers` threads) -> `ToTensor`; the batch is then copied out of FFCV's reused buffers. With
CUDA, uint8 batches are moved by `ToDevice(non_blocking=True)`, made `channels_last` by
`ToTorchImage`, and normalised on the GPU. The order is kesi's own (`ImageLoader.order`) and the
random ops are the seeded ones of `kesi_dist.data.ffcv_ops`; `_epoch_iterator` replaces FFCV's
epoch iterator with one whose worker-thread errors reach the caller.

FFCV and numba are imported only when a loader is built, so importing this module does not need them.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from kesi_dist.data.augment import CENTER_CROP_RATIO, RRC_RATIO, RRC_SCALE
from kesi_dist.data.image_loader import ImageLoader
from kesi_dist.errors import RunError

__all__ = ["FFCVLoader"]


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
