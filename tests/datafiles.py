"""Small datasets written in the official on-disk formats, for tests (no downloads).

Every writer returns a `WrittenDataset` with the root to pass as `--root` and the exact content
written (images as uint8 NHWC, labels, class names), so tests can check what a reader returns.

    from tests.datafiles import write_cifar10, write_cifar100, write_tiny_imagenet, write_imagefolder
    ds = write_cifar10(tmp_path, train_per_batch=20, test=30)     # tmp_path/cifar-10-batches-py/...
    prepare_dataset("cifar10", str(ds.root), out)

Images are random but class-dependent (each class has its own mean colour), so a model or a
nearest-centroid check can learn something from them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "WrittenDataset",
    "class_images",
    "write_cifar10",
    "write_cifar100",
    "write_tiny_imagenet",
    "write_imagefolder",
    "CIFAR10_CLASSES",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class WrittenDataset:
    root: Path  # what `--root` should be
    class_names: list[str]
    train_images: np.ndarray  # uint8 NHWC in reader order
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    files: dict  # name -> Path of notable files (to corrupt in tests)


def class_images(labels: np.ndarray, size: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """uint8 NHWC images: a per-class colour plus noise (learnable, not trivially constant)."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1234).uniform(40, 215, size=(num_classes, 3))
    base = colours[labels][:, None, None, :]
    noise = rng.normal(0, 25, size=(len(labels), size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _dump(path: Path, obj: dict, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(root: str | Path, train_per_batch: int = 20, test: int = 30, seed: int = 0,
                  protocol: int = 2) -> WrittenDataset:
    """`root/cifar-10-batches-py/` with data_batch_1..5, test_batch and batches.meta, the keys and
    dtypes of the official python version (data uint8 (N, 3072) in CHW row order, labels list)."""
    root = Path(root)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_train = 5 * train_per_batch
    train_labels = _balanced_labels(n_train, 10, rng)
    test_labels = _balanced_labels(test, 10, rng)
    train_images = class_images(train_labels, 32, 10, seed)
    test_images = class_images(test_labels, 32, 10, seed + 1)

    def batch(images, labels, name):
        return {"batch_label": name, "labels": [int(x) for x in labels],
                "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072).copy(),
                "filenames": [f"img_{i:05d}.png" for i in range(len(images))]}

    files = {}
    for b in range(5):
        sl = slice(b * train_per_batch, (b + 1) * train_per_batch)
        files[f"data_batch_{b + 1}"] = base / f"data_batch_{b + 1}"
        _dump(files[f"data_batch_{b + 1}"], batch(train_images[sl], train_labels[sl], f"training batch {b + 1} of 5"), protocol)
    files["test_batch"] = base / "test_batch"
    _dump(files["test_batch"], batch(test_images, test_labels, "testing batch 1 of 1"), protocol)
    files["batches.meta"] = base / "batches.meta"
    _dump(files["batches.meta"], {"num_cases_per_batch": train_per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072},
          protocol)
    return WrittenDataset(root, list(CIFAR10_CLASSES), train_images, train_labels, test_images, test_labels, files)


def write_cifar100(root: str | Path, train: int = 200, test: int = 100, seed: int = 0,
                   protocol: int = 2) -> WrittenDataset:
    """`root/cifar-100-python/` with train, test and meta (fine and coarse labels and names)."""
    root = Path(root)
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fine_names = [f"fine_{i:02d}" for i in range(100)]
    coarse_names = [f"coarse_{i:02d}" for i in range(20)]
    train_labels = _balanced_labels(train, 100, rng)
    test_labels = _balanced_labels(test, 100, rng)
    train_images = class_images(train_labels, 32, 100, seed)
    test_images = class_images(test_labels, 32, 100, seed + 1)

    def batch(images, labels, name):
        return {"filenames": [f"img_{i:05d}.png" for i in range(len(images))], "batch_label": name,
                "fine_labels": [int(x) for x in labels], "coarse_labels": [int(x) // 5 for x in labels],
                "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072).copy()}

    files = {"train": base / "train", "test": base / "test", "meta": base / "meta"}
    _dump(files["train"], batch(train_images, train_labels, "training batch 1 of 1"), protocol)
    _dump(files["test"], batch(test_images, test_labels, "testing batch 1 of 1"), protocol)
    _dump(files["meta"], {"fine_label_names": fine_names, "coarse_label_names": coarse_names}, protocol)
    return WrittenDataset(root, fine_names, train_images, train_labels, test_images, test_labels, files)


def _save(img: np.ndarray, path: Path, grayscale: bool = False, quality: int = 95) -> np.ndarray:
    """Save and return what a reader should decode (RGB; grayscale replicated)."""
    pil = Image.fromarray(img)
    if grayscale:
        pil = pil.convert("L")
    if path.suffix.lower() in (".jpeg", ".jpg"):
        pil.save(path, quality=quality)
    else:
        pil.save(path)
    with Image.open(path) as back:
        return np.asarray(back.convert("RGB"))


def write_tiny_imagenet(root: str | Path, num_classes: int = 3, train_per_class: int = 4, val_per_class: int = 2,
                        size: int = 64, seed: int = 0, grayscale_every: int = 5) -> WrittenDataset:
    """`root/tiny-imagenet-200/` in the official layout: wnids.txt, words.txt,
    train/<wnid>/images/<wnid>_<i>.JPEG (+ <wnid>_boxes.txt), val/images/val_<i>.JPEG with
    val/val_annotations.txt, test/images/. Every `grayscale_every`-th image is a 1-channel JPEG,
    as some official images are. Returned images are the decoded files (JPEG is lossy)."""
    base = Path(root) / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    wnids = [f"n{1443537 + 1000 * i:08d}" for i in range(num_classes)]
    (base / "train").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing number {i}, item {i}\n" for i, w in enumerate(wnids)))
    counter = 0
    tr_imgs = []
    for c, w in enumerate(wnids):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        labels = np.full(train_per_class, c)
        imgs = class_images(labels, size, num_classes, seed + c)
        boxes = []
        for i, img in enumerate(imgs):
            name = f"{w}_{i}.JPEG"
            tr_imgs.append(_save(img, folder / name, grayscale=counter % grayscale_every == 0))
            counter += 1
            boxes.append(f"{name}\t0\t0\t{size - 1}\t{size - 1}\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    # train order of the reader: wnids.txt order, then file name order within a class
    order = []
    for c, w in enumerate(wnids):
        names = sorted(f"{w}_{i}.JPEG" for i in range(train_per_class))
        order += [c * train_per_class + int(n.split("_")[1].split(".")[0]) for n in names]
    tr_imgs = [tr_imgs[i] for i in order]
    val_dir = base / "val" / "images"
    val_dir.mkdir(parents=True)
    val_labels = _balanced_labels(num_classes * val_per_class, num_classes, rng)
    val_imgs, ann = [], []
    for i, c in enumerate(val_labels):
        img = class_images(np.array([c]), size, num_classes, seed + 100 + i)[0]
        name = f"val_{i}.JPEG"
        val_imgs.append(_save(img, val_dir / name, grayscale=i % grayscale_every == 1))
        ann.append(f"{name}\t{wnids[c]}\t0\t0\t{size - 1}\t{size - 1}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(ann))
    (base / "test" / "images").mkdir(parents=True)
    _save(class_images(np.array([0]), size, num_classes, seed + 999)[0], base / "test" / "images" / "test_0.JPEG")
    files = {"wnids": base / "wnids.txt", "annotations": base / "val" / "val_annotations.txt",
             "first_train": base / "train" / wnids[0] / "images" / f"{wnids[0]}_0.JPEG",
             "first_val": val_dir / "val_0.JPEG", "first_class_dir": base / "train" / wnids[0] / "images"}
    train_labels = np.repeat(np.arange(num_classes), train_per_class).astype(np.int64)  # blocks per wnid
    return WrittenDataset(base, wnids, np.stack(tr_imgs), train_labels, np.stack(val_imgs), val_labels, files)


def write_imagefolder(root: str | Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), train_per_class: int = 5,
                      val_per_class: int = 2, size: int = 32, ext: str = ".png", seed: int = 0) -> WrittenDataset:
    """`root/train/<class>/img_<i><ext>` and `root/val/<class>/img_<i><ext>` (torchvision ImageFolder)."""
    root = Path(root)
    out = {}
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        imgs, labels = [], []
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            arr = class_images(np.full(per, c), size, len(classes), seed + c + (50 if split == "val" else 0))
            for i, img in enumerate(arr):  # names sort in write order for i < 10
                imgs.append(_save(img, folder / f"img_{i}{ext}"))
                labels.append(c)
        out[split] = (np.stack(imgs), np.array(labels, dtype=np.int64))
    files = {"first_train": root / "train" / classes[0] / f"img_0{ext}", "train": root / "train", "val": root / "val"}
    return WrittenDataset(root, list(classes), *out["train"], *out["val"], files)
