"""Dataset sources by name (`open_source`), and the CIFAR reader with its restricted unpickler.
Nothing is ever downloaded.

`open_source(source, root, resolution)` returns a `SourceData` (see `kesi_dist.data.splits`): a
train and a val split, the class names and a fingerprint of the input. Readers:
- cifar10:  root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (here)
- cifar100: root/cifar-100-python/{train, test, meta} (fine labels) (here)
- tiny-imagenet, imagefolder, digits: see `kesi_dist.data.folders`
- synthetic: see `kesi_dist.data.synthetic`

CIFAR pickles are read with an unpickler that only admits the numpy array constructors they use;
this module is the one place in kesi_dist that unpickles anything (tests/e2e/test_security.py).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from kesi_dist.data.folders import IMG_EXTENSIONS, read_digits, read_imagefolder, read_tiny_imagenet
from kesi_dist.data.splits import ArraySplit, FileSplit, SampleError, SourceData, Split, file_digest
from kesi_dist.data.synthetic import make_synthetic
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

    identity = {f: file_digest(base / f) for f in [*train_files, *val_files, meta_file]}
    return SourceData(f"cifar{num_classes}", load(train_files), load(val_files), names, resolution or 32, identity)


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
    return make_synthetic(resolution=resolution or 32, seed=seed, **options)
