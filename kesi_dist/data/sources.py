"""Readers of the real dataset formats. Nothing is ever downloaded.

Each reader returns a `SourceData`: a train and a val split (indexable, yielding uint8 RGB images
of `resolution` x `resolution` and int labels), the class names and a fingerprint of the input.
Images are decoded lazily, so FFCV's writer processes do the work in parallel.

Layouts (`root` as torchvision takes it):
- cifar10:  root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
- cifar100: root/cifar-100-python/{train, test, meta} (fine labels)
- tiny-imagenet: root = tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG,
  val/images/*.JPEG labelled by val/val_annotations.txt (tab separated: file, wnid, box)
- imagefolder: root/train/<class>/**/<image> and root/val/<class>/**/<image>
- digits: scikit-learn's bundled 8x8 digits, upsampled; fixed stratified 80/20 split
- synthetic: see `kesi_dist.data.synthetic`

CIFAR pickles are read with an unpickler that only admits the numpy array constructors they use.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from kesi_dist.errors import RunError, UsageError

__all__ = [
    "SOURCES",
    "Split",
    "SourceData",
    "ArraySplit",
    "FileSplit",
    "SampleError",
    "open_source",
    "read_cifar",
    "read_tiny_imagenet",
    "read_imagefolder",
    "read_digits",
    "safe_unpickle",
    "IMG_EXTENSIONS",
]

SOURCES = ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "digits", "synthetic")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


def _files_identity(paths: list[str], root: str) -> str:
    """Cheap identity of many files: relative path, size and mtime of each."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_image_side(path: str) -> int:
    try:
        with Image.open(path) as img:
            return min(img.size)
    except Exception as e:
        raise RunError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# CIFAR

class _NumpyOnlyUnpickler(pickle.Unpickler):
    # CIFAR's python pickles hold dicts, lists, str/bytes and numpy arrays, nothing else.
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        if name == "_frombuffer":
            from numpy._core.numeric import _frombuffer

            return _frombuffer
        if name == "scalar":
            from numpy._core.multiarray import scalar

            return scalar
        if name == "encode":
            import codecs

            return codecs.encode
        return getattr(np, name)


def safe_unpickle(path: Path) -> dict:
    """Load a CIFAR python pickle (latin1 strings, numpy arrays only); RunError names the file."""
    if not path.is_file():
        raise RunError(f"{path}: missing; expected the CIFAR python version as torchvision extracts it")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise RunError(f"{path}: truncated or not a CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: expected a dict, found {type(obj).__name__}")
    # Python 2 pickles read with encoding="bytes" elsewhere may carry bytes keys; accept both.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = safe_unpickle(path)
    if "data" not in d or label_key not in d:
        raise RunError(f"{path}: missing key {'data' if 'data' not in d else label_key!r}; not a CIFAR batch")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise RunError(
            f"{path}: data must be uint8 of shape (N, 3072) with N labels, got {data.dtype} {data.shape} "
            f"and {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise RunError(f"{path}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar(root: str | Path, num_classes: int, resolution: int | None = None) -> SourceData:
    """CIFAR-10 (`num_classes=10`) or CIFAR-100 (100, fine labels) from torchvision's folder layout."""
    root = Path(root)
    if num_classes == 10:
        base, train_files, val_files = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta_file, names_key, label_key = "batches.meta", "label_names", "labels"
    elif num_classes == 100:
        base, train_files, val_files = root / "cifar-100-python", ["train"], ["test"]
        meta_file, names_key, label_key = "meta", "fine_label_names", "fine_labels"
    else:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    if not base.is_dir():
        raise RunError(
            f"{base}: not found; --root must be the folder that holds {base.name}/ (as torchvision's CIFAR{num_classes} root)"
        )
    meta = safe_unpickle(base / meta_file)
    names = meta.get(names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise RunError(f"{base / meta_file}: expected {num_classes} names under {names_key!r}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def load(files: list[str]) -> ArraySplit:
        parts = [_cifar_batch(base / f, label_key, num_classes) for f in files]
        return ArraySplit(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), resolution)

    identity = {f: _file_digest(base / f) for f in [*train_files, *val_files, meta_file]}
    return SourceData(f"cifar{num_classes}", load(train_files), load(val_files), names, resolution or 32, identity)


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
        "train": _files_identity(train_paths, str(root)),
        "val": _files_identity(val_paths, str(root)),
        "annotations": _file_digest(ann),
        "wnids": _file_digest(wnids_file),
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
    identity = {"train": _files_identity(train_paths, str(root)), "val": _files_identity(val_paths, str(root))}
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


# ---------------------------------------------------------------------------------------------

def open_source(source: str, root: str | None, resolution: int | None = None, seed: int = 0, **options) -> SourceData:
    """Dispatch to the reader of `source`; UsageError for an unknown source or a missing root."""
    if source not in SOURCES:
        raise UsageError(f"--source {source!r}: unknown; choose one of {', '.join(SOURCES)}")
    if resolution is not None and not 8 <= int(resolution) <= 1024:
        raise UsageError(f"--resolution {resolution}: must be between 8 and 1024")
    allowed = {"synthetic": {"num_train", "num_val", "num_classes", "difficulty"}}.get(source, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UsageError(f"source {source!r} takes no option {unknown[0]!r}" + (f"; allowed: {', '.join(sorted(allowed))}" if allowed else ""))
    if source in ("cifar10", "cifar100", "tiny-imagenet", "imagefolder"):
        if not root:
            raise UsageError(f"--root is required for source {source!r} (the folder torchvision would take)")
        if not Path(root).is_dir():
            raise RunError(f"{root}: --root folder does not exist")
    if source == "cifar10":
        return read_cifar(root, 10, resolution)
    if source == "cifar100":
        return read_cifar(root, 100, resolution)
    if source == "tiny-imagenet":
        return read_tiny_imagenet(root, resolution)
    if source == "imagefolder":
        return read_imagefolder(root, resolution)
    if source == "digits":
        return read_digits(resolution)
    from kesi_dist.data.synthetic import make_synthetic

    return make_synthetic(resolution=resolution or 32, seed=seed, **options)
