"""Readers of the real formats (no FFCV involved): contents, labels, class names, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from kesi_dist.data.folders import read_digits, read_imagefolder, read_tiny_imagenet
from kesi_dist.data.sources import open_source, read_cifar, safe_unpickle
from kesi_dist.data.synthetic import make_synthetic
from kesi_dist.errors import RunError, UsageError
from tests.datafiles import write_cifar10, write_cifar100, write_imagefolder, write_tiny_imagenet


def _all(split):
    imgs, labels, idx = zip(*(split[i] for i in range(len(split))))
    return np.stack(imgs), np.array(labels), np.array(idx)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_reader_matches_written_pickles(tmp_path, protocol):
    ds = write_cifar10(tmp_path, train_per_batch=6, test=7, protocol=protocol)
    data = read_cifar(ds.root, 10)
    imgs, labels, idx = _all(data.train)
    assert imgs.shape == (30, 32, 32, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs, ds.train_images)
    np.testing.assert_array_equal(labels, ds.train_labels)
    np.testing.assert_array_equal(idx, np.arange(30))
    vimgs, vlabels, _ = _all(data.val)
    np.testing.assert_array_equal(vimgs, ds.val_images)
    np.testing.assert_array_equal(vlabels, ds.val_labels)
    assert data.class_names == ds.class_names and data.resolution == 32


def test_cifar100_reader_uses_fine_labels(tmp_path):
    ds = write_cifar100(tmp_path, train=120, test=40)
    data = open_source("cifar100", str(ds.root))
    _, labels, _ = _all(data.train)
    np.testing.assert_array_equal(labels, ds.train_labels)
    assert labels.max() > 19  # fine, not coarse
    assert len(data.class_names) == 100 and data.class_names[7] == "fine_07"


def test_cifar_resize_on_read(tmp_path):
    ds = write_cifar10(tmp_path, train_per_batch=2, test=2)
    img, _, _ = read_cifar(ds.root, 10, resolution=48).train[0]
    assert img.shape == (48, 48, 3)


def test_truncated_pickle_names_the_file(tmp_path):
    ds = write_cifar10(tmp_path, train_per_batch=4, test=4)
    f = ds.files["data_batch_3"]
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(RunError, match="data_batch_3.*truncated"):
        read_cifar(ds.root, 10)


def test_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil"
    p.write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(RunError, match="refusing to load builtins.print"):
        safe_unpickle(p)


def test_cifar_wrong_root_names_expected_folder(tmp_path):
    with pytest.raises(RunError, match="cifar-10-batches-py"):
        open_source("cifar10", str(tmp_path))


def test_tiny_imagenet_reader_layout_and_grayscale(tmp_path):
    ds = write_tiny_imagenet(tmp_path, num_classes=3, train_per_class=4, val_per_class=2)
    data = read_tiny_imagenet(ds.root)
    assert data.class_names == ds.class_names and data.resolution == 64
    assert data.extra_meta["class_words"][1] == "thing number 1, item 1"
    imgs, labels, _ = _all(data.train)
    np.testing.assert_array_equal(labels, ds.train_labels)
    np.testing.assert_array_equal(imgs, ds.train_images)  # decoded identically, grayscale replicated
    gray = imgs[0]
    assert gray.shape == (64, 64, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    vimgs, vlabels, _ = _all(data.val)
    np.testing.assert_array_equal(vlabels, ds.val_labels)
    np.testing.assert_array_equal(vimgs, ds.val_images)


def test_tiny_imagenet_errors_name_the_file(tmp_path):
    ds = write_tiny_imagenet(tmp_path, num_classes=2, train_per_class=2, val_per_class=1)
    ann = ds.files["annotations"]
    text = ann.read_text()
    ann.write_text(text + "val_99.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(RunError, match=r"val_annotations.txt:3: wnid 'n99999999'"):
        read_tiny_imagenet(ds.root)
    ann.write_text(text + f"val_99.JPEG\t{ds.class_names[0]}\t0\t0\t1\t1\n")
    with pytest.raises(RunError, match=r"val_99.JPEG: listed in val_annotations.txt line 3 but missing"):
        read_tiny_imagenet(ds.root)
    ann.write_text(text)
    for f in ds.files["first_class_dir"].iterdir():
        f.unlink()
    with pytest.raises(RunError, match=r"images: class folder has no images"):
        read_tiny_imagenet(ds.root)
    ds.files["wnids"].unlink()
    with pytest.raises(RunError, match=r"wnids.txt: missing"):
        read_tiny_imagenet(ds.root)


def test_imagefolder_reader(tmp_path):
    ds = write_imagefolder(tmp_path, classes=("b_dog", "a_cat"), train_per_class=3, val_per_class=1, size=20)
    data = read_imagefolder(ds.root, resolution=16)
    assert data.class_names == ["a_cat", "b_dog"]  # sorted like torchvision
    imgs, labels, _ = _all(data.train)
    assert imgs.shape == (6, 16, 16, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert read_imagefolder(ds.root).resolution == 20  # default: first image's side


def test_imagefolder_errors(tmp_path):
    ds = write_imagefolder(tmp_path, classes=("cat", "dog"), train_per_class=1, val_per_class=1)
    (ds.root / "val" / "owl").mkdir()
    with pytest.raises(RunError, match=r"val/owl: class folder not present under train/"):
        read_imagefolder(ds.root)
    (ds.root / "val" / "owl").rmdir()
    (ds.root / "train" / "emu").mkdir()
    with pytest.raises(RunError, match=r"train/emu: class folder has no images"):
        read_imagefolder(ds.root)
    with pytest.raises(RunError, match=r"train/train: missing; imagefolder --root needs"):
        read_imagefolder(tmp_path / "train")


def test_digits_fixed_stratified_split():
    data = read_digits(resolution=24)
    assert (len(data.train), len(data.val)) == (1437, 360)
    _, labels, _ = _all(data.val)
    assert np.bincount(labels, minlength=10).min() >= 35  # every digit represented ~equally
    img, _, _ = data.train[0]
    assert img.shape == (24, 24, 3) and img.max() > 200
    _, again, _ = _all(read_digits(resolution=24).val)
    np.testing.assert_array_equal(labels, again)


def _nearest_centroid_accuracy(data) -> float:
    x, y, _ = _all(data.train)
    xv, yv, _ = _all(data.val)
    x, xv = x.reshape(len(x), -1).astype(float), xv.reshape(len(xv), -1).astype(float)
    cents = np.stack([x[y == c].mean(0) for c in range(y.max() + 1)])
    pred = ((xv[:, None, :] - cents[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yv).mean())


def test_synthetic_deterministic_and_difficulty_controls_separability():
    a = make_synthetic(num_train=200, num_val=100, num_classes=5, difficulty=0.0, resolution=16, seed=3)
    b = make_synthetic(num_train=200, num_val=100, num_classes=5, difficulty=0.0, resolution=16, seed=3)
    np.testing.assert_array_equal(a.train[17][0], b.train[17][0])
    assert not np.array_equal(a.train[17][0], make_synthetic(200, 100, 5, 0.0, 16, seed=4).train[17][0])
    assert np.bincount(_all(a.train)[1]).tolist() == [40] * 5
    easy = _nearest_centroid_accuracy(a)
    hard = _nearest_centroid_accuracy(make_synthetic(200, 100, 5, 1.0, 16, seed=3))
    assert easy >= 0.98 and hard < easy - 0.2, (easy, hard)


def test_bad_source_and_options():
    with pytest.raises(UsageError, match="unknown"):
        open_source("mnist", None)
    with pytest.raises(UsageError, match="--root is required"):
        open_source("cifar10", None)
    with pytest.raises(UsageError, match="difficulty"):
        open_source("synthetic", None, difficulty=2.0)
    with pytest.raises(UsageError, match="takes no option 'num_train'"):
        open_source("digits", None, num_train=5)
