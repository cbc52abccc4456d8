"""Readers of the folder-based formats: Tiny-ImageNet's official layout, torchvision ImageFolder
trees, and scikit-learn's bundled digits. Nothing is ever downloaded.

Layouts (`root` as torchvision takes it):
- tiny-imagenet: root = tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG,
  val/images/*.JPEG labelled by val/val_annotations.txt (tab separated: file, wnid, box)
- imagefolder: root/train/<class>/**/<image> and root/val/<class>/**/<image>
- digits: scikit-learn's bundled 8x8 digits, upsampled; fixed stratified 80/20 split

Use `kesi_dist.data.sources.open_source` to pick a reader by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from kesi_dist.data.splits import ArraySplit, FileSplit, SourceData, file_digest, files_identity
from kesi_dist.errors import RunError

__all__ = ["read_tiny_imagenet", "read_imagefolder", "read_digits", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _first_image_side(path: str) -> int:
    try:
        with Image.open(path) as img:
            return min(img.size)
    except Exception as e:
        raise RunError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet

def read_tiny_imagenet(root: str | Path, resolution: int | None = None) -> SourceData:
    """The official tiny-imagenet-200 layout; class names are the wnids in wnids.txt order."""
    root = Path(root)
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise RunError(f"{wnids_file}: missing; --root must be the tiny-imagenet-200 folder")
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise RunError(f"{wnids_file}: expected one unique wnid per line")
    index = {w: i for i, w in enumerate(wnids)}

    train_paths, train_labels = [], []
    for w in wnids:
        folder = root / "train" / w / "images"
        if not folder.is_dir():
            raise RunError(f"{folder}: missing; every wnid in wnids.txt needs train/<wnid>/images/")
        files = sorted(p for p in os.listdir(folder) if p.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise RunError(f"{folder}: class folder has no images")
        train_paths += [str(folder / f) for f in files]
        train_labels += [index[w]] * len(files)

    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise RunError(f"{ann}: missing; expected tab-separated lines 'file<TAB>wnid<TAB>box'")
    val_paths, val_labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise RunError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>box', got {line!r}")
        fname, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise RunError(f"{ann}:{n}: wnid {wnid!r} is not in wnids.txt")
        path = root / "val" / "images" / fname
        if not path.is_file():
            raise RunError(f"{path}: listed in {ann.name} line {n} but missing")
        val_paths.append(str(path))
        val_labels.append(index[wnid])
    if not val_paths:
        raise RunError(f"{ann}: no validation images listed")

    res = resolution or 64
    words = {}
    words_file = root / "words.txt"
    if words_file.is_file():
        for line in words_file.read_text().splitlines():
            k, _, v = line.partition("\t")
            words[k.strip()] = v.strip()
    identity = {
        "train": files_identity(train_paths, str(root)),
        "val": files_identity(val_paths, str(root)),
        "annotations": file_digest(ann),
        "wnids": file_digest(wnids_file),
    }
    extra = {"class_words": [words.get(w, "") for w in wnids]} if words else {}
    return SourceData("tiny-imagenet", FileSplit(train_paths, train_labels, res), FileSplit(val_paths, val_labels, res),
                      wnids, res, identity, extra)


# ---------------------------------------------------------------------------------------------
# ImageFolder

def _scan_class_folders(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[str], list[int]]:
    if not split_dir.is_dir():
        raise RunError(f"{split_dir}: missing; imagefolder --root needs train/<class>/... and val/<class>/...")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not found:
        raise RunError(f"{split_dir}: no class folders")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise RunError(f"{split_dir / extra[0]}: class folder not present under train/")
    paths, labels = [], []
    for ci, c in enumerate(classes):
        cdir = split_dir / c
        if not cdir.is_dir():
            continue  # a class may have no validation images; that is the user's choice
        files = []
        for dirpath, _, names in os.walk(cdir, followlinks=True):
            files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
        if not files:
            raise RunError(f"{cdir}: class folder has no images ({', '.join(IMG_EXTENSIONS)})")
        files.sort()
        paths += files
        labels += [ci] * len(files)
    return classes, paths, labels


def read_imagefolder(root: str | Path, resolution: int | None = None) -> SourceData:
    """torchvision ImageFolder trees under root/train and root/val; classes from train/, sorted.

    Stored images are squares: shorter side resized to `resolution` then center-cropped. The
    default `resolution` is the shorter side of the first training image.
    """
    root = Path(root)
    classes, train_paths, train_labels = _scan_class_folders(root / "train", None)
    _, val_paths, val_labels = _scan_class_folders(root / "val", classes)
    if not val_paths:
        raise RunError(f"{root / 'val'}: no images")
    res = resolution or _first_image_side(train_paths[0])
    identity = {"train": files_identity(train_paths, str(root)), "val": files_identity(val_paths, str(root))}
    return SourceData("imagefolder", FileSplit(train_paths, train_labels, res), FileSplit(val_paths, val_labels, res),
                      classes, res, identity)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits

def read_digits(resolution: int | None = None) -> SourceData:
    """sklearn's 1,797 8x8 digits as RGB, upsampled (bilinear) to `resolution` (default 32).

    The train/val split is fixed (stratified, 20 % val, random_state 0) so every run evaluates on
    the same 360 images.
    """
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    res = resolution or 32
    d = load_digits()
    small = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((res, res), Image.BILINEAR)) for im in small])
    rgb = np.repeat(big[..., None], 3, axis=3)
    idx_train, idx_val = train_test_split(np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0)
    identity = {"sklearn": sklearn.__version__, "n": int(len(d.target)), "sum": int(d.images.sum())}
    return SourceData("digits", ArraySplit(rgb[idx_train], d.target[idx_train], res),
                      ArraySplit(rgb[idx_val], d.target[idx_val], res), [str(i) for i in range(10)], res, identity)
