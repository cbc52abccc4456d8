"""Data layer: readers of the real formats, FFCV `.beton` preparation, FFCV and torch loaders.

    prepare_dataset("cifar10", "/data", "/data/c10-ffcv")           # once: train/val .beton + meta.json
    loader = make_loader("/data/c10-ffcv", "train", batch_size=128, resolution=32, augment="cifar")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader: ...

Submodules import FFCV lazily where they can, so `kesi_dist.data.sources` works without it.
"""

from kesi_dist.data.image_loader import ImageLoader
from kesi_dist.data.loaders import AUGMENTS, BACKENDS, make_loader, read_meta
from kesi_dist.data.prepare import prepare_dataset
from kesi_dist.data.sources import SOURCES

__all__ = ["SOURCES", "AUGMENTS", "BACKENDS", "prepare_dataset", "make_loader", "read_meta", "ImageLoader"]
