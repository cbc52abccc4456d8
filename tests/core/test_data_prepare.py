"""`prepare_dataset` / `kesi data prepare`: official trees in, .beton + meta.json out, read back via FFCV."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kesi_dist.cli import main
from kesi_dist.data import make_loader, prepare_dataset, read_meta
from kesi_dist.data.beton import BetonFile
from kesi_dist.errors import RunError
from tests.datafiles import write_cifar10, write_cifar100, write_imagefolder, write_tiny_imagenet


def _read_back(out, split, res):
    """Every sample of a split through the FFCV loader, in file order, as uint8-scale pixels."""
    meta = read_meta(out)
    ld = make_loader(out, split, batch_size=16, resolution=res, augment="none", backend="ffcv", num_workers=1,
                     shuffle=False, drop_last=False, return_indices=True)
    xs, ys, ids = zip(*ld)
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    pixels = (torch.cat(xs) * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return pixels, torch.cat(ys).numpy(), torch.cat(ids).numpy()


def test_cifar10_prepare_and_read_back_through_ffcv(tmp_path):
    ds = write_cifar10(tmp_path / "raw", train_per_batch=8, test=12)
    out = tmp_path / "out"
    meta = prepare_dataset("cifar10", str(ds.root), out, workers=1)
    assert (meta["num_classes"], meta["train_size"], meta["val_size"], meta["resolution"]) == (10, 40, 12, 32)
    assert meta["class_names"] == ds.class_names and meta["source"] == "cifar10"
    assert json.loads((out / "meta.json").read_text()) == meta
    expected_mean = ds.train_images.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(meta["mean"], expected_mean, atol=1e-3)
    np.testing.assert_allclose(meta["std"], ds.train_images.reshape(-1, 3).std(0), atol=1e-3)
    pixels, labels, ids = _read_back(out, "train", 32)
    np.testing.assert_array_equal(ids, np.arange(40))
    np.testing.assert_array_equal(labels, ds.train_labels)
    np.testing.assert_array_equal(pixels, ds.train_images)  # raw storage: lossless
    _, vlabels, _ = _read_back(out, "val", 32)
    np.testing.assert_array_equal(vlabels, ds.val_labels)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.beton", "val.beton"]


def test_cifar100_prepare(tmp_path):
    ds = write_cifar100(tmp_path / "raw", train=100, test=50)
    meta = prepare_dataset("cifar100", str(ds.root), tmp_path / "out", workers=1)
    assert (meta["num_classes"], meta["train_size"], meta["val_size"]) == (100, 100, 50)
    assert meta["class_names"][:2] == ["fine_00", "fine_01"]
    f = BetonFile(tmp_path / "out" / "train.beton")
    np.testing.assert_array_equal(f.labels, ds.train_labels)
    np.testing.assert_array_equal(f.image(42), ds.train_images[42])


def test_tiny_imagenet_prepare_and_read_back(tmp_path):
    ds = write_tiny_imagenet(tmp_path / "raw", num_classes=3, train_per_class=5, val_per_class=3)
    out = tmp_path / "tin"
    meta = prepare_dataset("tiny-imagenet", str(ds.root), out, workers=1)
    assert (meta["num_classes"], meta["train_size"], meta["val_size"], meta["resolution"]) == (3, 15, 9, 64)
    assert meta["class_names"] == ds.class_names and meta["class_words"][0] == "thing number 0, item 0"
    pixels, labels, _ = _read_back(out, "train", 64)
    np.testing.assert_array_equal(labels, ds.train_labels)
    np.testing.assert_array_equal(pixels, ds.train_images)
    vpixels, vlabels, _ = _read_back(out, "val", 64)
    np.testing.assert_array_equal(vlabels, ds.val_labels)
    np.testing.assert_array_equal(vpixels, ds.val_images)


def test_imagefolder_prepare_jpeg_storage_above_128px(tmp_path):
    ds = write_imagefolder(tmp_path / "raw", classes=("a", "b"), train_per_class=3, val_per_class=2, size=150, ext=".jpg")
    meta = prepare_dataset("imagefolder", str(ds.root), tmp_path / "out", workers=1)
    assert meta["write_mode"] == "jpg" and meta["resolution"] == 150
    pixels, labels, _ = _read_back(tmp_path / "out", "train", 150)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    diff = pixels.astype(float) - ds.train_images.astype(float)
    assert np.abs(diff).mean() < 10  # JPEG q90 of pure noise: lossy per pixel...
    assert np.abs(diff.mean(axis=(1, 2))).max() < 2  # ...but faithful in colour


def test_rerun_is_a_noop_and_changed_options_rebuild(tmp_path):
    out = tmp_path / "syn"
    opts = dict(num_train=40, num_val=20, num_classes=4, difficulty=0.1)
    m1 = prepare_dataset("synthetic", None, out, resolution=16, workers=1, **opts)
    stamp = (out / "train.beton").stat().st_mtime_ns
    m2 = prepare_dataset("synthetic", None, out, resolution=16, workers=1, **opts)
    assert m1 == m2 and (out / "train.beton").stat().st_mtime_ns == stamp
    m3 = prepare_dataset("synthetic", None, out, resolution=16, workers=1, **{**opts, "num_train": 48})
    assert m3["train_size"] == 48 and m3["fingerprint"] != m1["fingerprint"]


def test_corrupt_jpeg_names_the_file_and_keeps_the_previous_dataset(tmp_path):
    ds = write_tiny_imagenet(tmp_path / "raw", num_classes=2, train_per_class=3, val_per_class=2)
    out = tmp_path / "tin"
    prepare_dataset("tiny-imagenet", str(ds.root), out, workers=1)
    assert (out / "meta.json").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = ds.files["first_val"]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])  # truncated JPEG
    with pytest.raises(RunError, match=r"val_0.JPEG: cannot decode image"):
        prepare_dataset("tiny-imagenet", str(ds.root), out, workers=1)
    # The failed conversion replaced nothing: the previous, complete dataset is still there as it was.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files left either
    assert read_meta(out)["val_size"] == 4
    fresh = tmp_path / "fresh"
    with pytest.raises(RunError, match=r"val_0.JPEG: cannot decode image"):
        prepare_dataset("tiny-imagenet", str(ds.root), fresh, workers=1)
    assert not [p for p in fresh.iterdir()]  # a new folder is left with nothing that looks complete
    with pytest.raises(RunError, match="meta.json: missing"):
        read_meta(fresh)


def test_cli_prepare_success_and_one_line_error(tmp_path, capsys):
    ds = write_cifar10(tmp_path / "raw", train_per_batch=2, test=4)
    assert main(["data", "prepare", "--source", "cifar10", "--root", str(ds.root), "--out", str(tmp_path / "o")]) == 0
    assert "prepared 10 train / 4 val images, 10 classes, 32px" in capsys.readouterr().out
    ds.files["test_batch"].write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    code = main(["data", "prepare", "--source", "cifar10", "--root", str(ds.root), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and "test_batch: truncated or not a CIFAR pickle" in err[-1]
    assert not (tmp_path / "o2" / "meta.json").exists()
    code = main(["data", "prepare", "--source", "cifar10", "--out", str(tmp_path / "o3")])
    assert code == 2 and "--root is required" in capsys.readouterr().err
