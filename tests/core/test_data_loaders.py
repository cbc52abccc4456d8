"""make_loader: FFCV and torch backends agree exactly; epochs replay; shapes, formats, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kesi_dist.data import make_loader, prepare_dataset, read_meta
from kesi_dist.data.augment import RRC_RATIO, RRC_SCALE, center_crop_box, epoch_order, random_resized_crop_box
from kesi_dist.errors import BadValue, RunError, UsageError

N_TRAIN, N_VAL = 90, 37  # odd sizes: exercise partial batches and uneven shards


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loaders")
    prepare_dataset("synthetic", None, out, resolution=16, seed=1, workers=1,
                    num_train=N_TRAIN, num_val=N_VAL, num_classes=6, difficulty=0.5)
    return out


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    xs, ys, ids = zip(*loader)
    return torch.cat(xs), torch.cat(ys), torch.cat(ids)


@pytest.mark.slow  # 10-60 s on the shared 2-core machine: three FFCV pipelines compiled per case
@pytest.mark.parametrize("augment,resolution", [("cifar", 16), ("cifar", 24), ("imagenet", 12)])
def test_ffcv_and_torch_backends_yield_identical_batches(data_dir, augment, resolution):
    kw = dict(batch_size=16, resolution=resolution, augment=augment, seed=5, return_indices=True)
    for split in ("train", "val"):
        f = make_loader(data_dir, split, backend="ffcv", num_workers=2, **kw)
        t = make_loader(data_dir, split, backend="torch", num_workers=2 if split == "train" else 0, **kw)
        assert len(f) == len(t) > 0
        for epoch in (0, 3):
            xf, yf, idf = _epoch(f, epoch)
            xt, yt, idt = _epoch(t, epoch)
            assert xf.shape == (len(f.order(epoch)) // 16 * 16 if split == "train" else N_VAL, 3, resolution, resolution)
            assert torch.equal(idf, idt) and torch.equal(yf, yt)
            torch.testing.assert_close(xf, xt, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param("ffcv", marks=pytest.mark.slow), "torch"])  # FFCV compiles its pipeline: seconds
def test_window_yields_exactly_those_batches_of_the_full_epoch(data_dir, backend):
    """The soft-label pass splits an epoch by windows: a window's batches are the full epoch's."""
    kw = dict(batch_size=8, resolution=16, augment="cifar", seed=3, shuffle=True, drop_last=False,
              return_indices=True, backend=backend, num_workers=1 if backend == "ffcv" else 0)
    ld = make_loader(data_dir, "train", **kw)
    x, y, i = _epoch(ld, 1)
    pieces = []
    for first, stop in ((0, 3), (3, 7), (7, 12)):  # 90 samples: 12 batches, the last one partial
        ld.set_window(first * 8, stop * 8)
        assert len(ld) == stop - first
        pieces.append(_epoch(ld, 1))
    ld.set_window(None)
    assert len(ld) == 12
    assert torch.equal(torch.cat([p[2] for p in pieces]), i) and torch.equal(torch.cat([p[1] for p in pieces]), y)
    torch.testing.assert_close(torch.cat([p[0] for p in pieces]), x, rtol=0, atol=0)


def test_work_units_cover_each_epoch_once():
    from kesi_dist.distill.shards import work_units

    for batches, epochs, actors in ((8, 2, 2), (391, 30, 8), (3, 1, 4), (1, 5, 2)):
        units = work_units(batches, epochs, actors)
        for e in range(epochs):
            runs = sorted((a, b) for ep, _, a, b in units if ep == e)
            assert runs[0][0] == 0 and runs[-1][1] == batches and all(a < b for a, b in runs)
            assert all(runs[k][1] == runs[k + 1][0] for k in range(len(runs) - 1))
        assert len(units) >= min(batches * epochs, 8 * actors)  # enough units to balance the actors


@pytest.mark.slow  # 10-35 s on the shared 2-core machine
def test_epochs_replay_and_differ(data_dir):
    ld = make_loader(data_dir, "train", batch_size=10, resolution=16, augment="cifar", seed=0, return_indices=True)
    x0, y0, i0 = _epoch(ld, 2)
    x1, y1, i1 = _epoch(ld, 2)
    assert torch.equal(i0, i1) and torch.equal(x0, x1)  # same (seed, epoch): same order and pixels
    x2, _, i2 = _epoch(ld, 3)
    assert not torch.equal(i0, i2)
    same_sample = {int(i): k for k, i in enumerate(i2)}
    pairs = [(k, same_sample[int(i)]) for k, i in enumerate(i0) if int(i) in same_sample]
    changed = sum(not torch.equal(x0[a], x2[b]) for a, b in pairs)
    assert changed > 0.8 * len(pairs)  # the augmentation is redrawn each epoch
    other = make_loader(data_dir, "train", batch_size=10, resolution=16, augment="cifar", seed=0, return_indices=True)
    assert torch.equal(_epoch(other, 2)[2], i0)  # a fresh loader (a resumed run) replays epoch 2
    reseeded = make_loader(data_dir, "train", batch_size=10, resolution=16, augment="cifar", seed=1)
    assert not np.array_equal(reseeded.order(2), ld.order(2))


def test_iterating_without_set_epoch_advances(data_dir):
    ld = make_loader(data_dir, "train", batch_size=30, resolution=16, augment="none", backend="torch",
                     num_workers=0, return_indices=True)
    first = torch.cat([b[2] for b in ld])
    second = torch.cat([b[2] for b in ld])
    assert ld.epoch == 1
    np.testing.assert_array_equal(first.numpy(), ld.order(0)[:90])
    np.testing.assert_array_equal(second.numpy(), ld.order(1)[:90])


@pytest.mark.slow  # compiles FFCV pipelines: seconds, kept out of the fast part
def test_defaults_lengths_and_formats(data_dir):
    meta = read_meta(data_dir)
    tr = make_loader(data_dir, "train", batch_size=32, resolution=16)
    va = make_loader(data_dir, "val", batch_size=32, resolution=16, return_indices=True)
    assert (len(tr), len(va)) == (N_TRAIN // 32, 2)  # train drops the last partial batch, val keeps it
    batches = list(va)
    assert [b[0].shape[0] for b in batches] == [32, 5]
    np.testing.assert_array_equal(torch.cat([b[2] for b in batches]).numpy(), np.arange(N_VAL))  # val: in order
    x, y = next(iter(tr))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (32, 3, 16, 16) and x.is_contiguous()
    assert 0 <= int(y.min()) and int(y.max()) < meta["num_classes"]
    cl = make_loader(data_dir, "val", batch_size=8, resolution=16, channels_last=True)
    xc, _ = next(iter(cl))
    assert xc.is_contiguous(memory_format=torch.channels_last)


def test_normalisation_uses_train_statistics(data_dir):
    ld = make_loader(data_dir, "train", batch_size=45, resolution=16, augment="none", shuffle=False)
    x = torch.cat([b[0] for b in ld])
    assert x.shape[0] == N_TRAIN
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2, rtol=0)


def test_augmentation_boxes_follow_torchvision_bounds():
    areas, ratios = [], []
    for i in range(2000):
        top, left, h, w = random_resized_crop_box(0, 0, i, 64, 64, *RRC_SCALE, *RRC_RATIO)
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 64
        areas.append(h * w / 64 ** 2)
        ratios.append(w / h)
    assert 0.07 < min(areas) and max(areas) <= 1.0 and 0.4 < np.mean(areas) < 0.65
    assert 0.7 < min(ratios) and max(ratios) < 1.4
    assert center_crop_box(64, 64, 0.875) == (4, 4, 56, 56)


def test_epoch_order_shards_are_disjoint():
    shards = [epoch_order(103, seed=1, epoch=4, shuffle=True, rank=r, world_size=3) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(103))
    eq = [epoch_order(103, seed=1, epoch=4, shuffle=True, rank=r, world_size=3, drop_last=True) for r in range(3)]
    assert {len(s) for s in eq} == {34} and len(set(np.concatenate(eq).tolist())) == 102


def test_bad_arguments_and_incomplete_folders(data_dir, tmp_path):
    with pytest.raises(UsageError, match="split 'test'"):
        make_loader(data_dir, "test", batch_size=4, resolution=16)
    with pytest.raises(BadValue, match="augment: 'autoaugment'"):
        make_loader(data_dir, "train", batch_size=4, resolution=16, augment="autoaugment")
    with pytest.raises(BadValue, match="backend: 'dali'"):
        make_loader(data_dir, "train", batch_size=4, resolution=16, backend="dali")
    with pytest.raises(UsageError, match="torch.distributed initialised"):
        make_loader(data_dir, "train", batch_size=4, resolution=16, distributed=True)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            make_loader(data_dir, "train", batch_size=4, resolution=16, device="cuda")
    with pytest.raises(RunError, match="meta.json: missing; the dataset is not prepared"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(read_meta(data_dir)))
    with pytest.raises(RunError, match="train.beton: missing although meta.json exists"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(RunError, match="meta.json: not valid JSON"):
        read_meta(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU path: ToDevice, channels_last)")
def test_gpu_path_matches_cpu(data_dir):
    kw = dict(batch_size=16, resolution=16, augment="cifar", seed=2, return_indices=True)
    xg, yg, ig = _epoch(make_loader(data_dir, "train", device="cuda", channels_last=True, **kw), 1)
    xc, yc, ic = _epoch(make_loader(data_dir, "train", **kw), 1)
    assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ig.cpu(), ic) and torch.equal(yg.cpu(), yc)
    torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-5)


def test_error_in_ffcv_thread_is_raised_not_hung(data_dir):
    """FFCV's EpochIterator thread dies silently on an exception; ours re-raises it in the consumer."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import ToTensor

    from kesi_dist.data.ffcv_ops import CropResizeDecoder
    from kesi_dist.data.ffcv_loader import _epoch_iterator

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise ValueError("boom in the pipeline")

    ld = Loader(str(data_dir / "val.beton"), batch_size=8, num_workers=1, pipelines={
        "image": [CropResizeDecoder(16, "stored"), ToTensor(), Boom()], "label": [IntDecoder(), ToTensor()],
        "index": None})
    with pytest.raises(RunError, match="FFCV pipeline failed: ValueError: boom in the pipeline"):
        list(_epoch_iterator(ld, 0, len(ld) * ld.batch_size))


@pytest.mark.parametrize("backend", [pytest.param("ffcv", marks=pytest.mark.slow), "torch"])  # FFCV compiles its pipeline: seconds
def test_reuse_hands_back_the_same_loader_until_the_files_change(data_dir, tmp_path, backend):
    """`reuse=True` (what training workers ask for): the same object for the same arguments on the same
    files, replaying an epoch exactly like a fresh loader; new files or other arguments get a new one."""
    import os
    import shutil

    own = tmp_path / "data"
    shutil.copytree(data_dir, own)
    kw = dict(batch_size=32, resolution=16, augment="cifar", backend=backend, num_workers=1, seed=3)
    a = make_loader(own, "train", reuse=True, **kw)
    a.set_window(0, 64)  # a caller's window does not stick to the next user
    assert make_loader(own, "train", reuse=True, **kw) is a and a.window is None
    assert make_loader(own, "train", reuse=True, **{**kw, "seed": 4}) is not a
    fresh = make_loader(own, "train", **kw)
    for loader in (a, fresh):
        loader.set_epoch(2)
    for (x, y), (fx, fy) in zip(a, fresh):
        assert torch.equal(x, fx) and torch.equal(y, fy)
    os.utime(own / "train.beton", ns=(1, 1))  # the dataset was rewritten: do not serve the old map
    assert make_loader(own, "train", reuse=True, **kw) is not a
