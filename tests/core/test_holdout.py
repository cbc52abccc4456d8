"""The held-out selection split: stratified, seeded, disjoint from what the training loaders serve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kesi_dist.data import make_loader, prepare_dataset
from kesi_dist.data.holdout import describe_holdout, holdout_indices, split_train
from kesi_dist.errors import BadValue

N_TRAIN, CLASSES = 90, 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("holdout")
    prepare_dataset("synthetic", None, out, resolution=16, seed=1, workers=1, num_train=N_TRAIN, num_val=20,
                    num_classes=CLASSES, difficulty=0.5)
    return out


def test_indices_are_stratified_seeded_and_sorted():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    held = holdout_indices(labels, 0.1, seed=3)
    assert np.array_equal(np.bincount(labels[held]), [1, 2, 3, 4])  # 10 % of every class
    assert np.array_equal(held, np.sort(held)) and len(np.unique(held)) == len(held)
    assert np.array_equal(held, holdout_indices(labels, 0.1, seed=3))  # same seed, same images
    assert not np.array_equal(held, holdout_indices(labels, 0.1, seed=4))
    assert np.array_equal(np.bincount(labels[holdout_indices(labels, 5, seed=0)]), [5, 5, 5, 5])  # count per class
    assert np.array_equal(np.bincount(labels[holdout_indices(labels, 0.01, seed=0)]), [1, 1, 1, 1])  # at least one
    assert len(holdout_indices(labels, 0, seed=0)) == 0


@pytest.mark.parametrize("bad", [-0.1, 2.5, 10, 0.99])
def test_a_holdout_that_leaves_a_class_empty_or_is_malformed_is_refused(bad):
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    with pytest.raises(BadValue, match="holdout"):
        holdout_indices(labels, bad, seed=0)


def _indices(loader, epoch=0):
    loader.set_epoch(epoch)
    return torch.cat([b[2] for b in loader]).numpy()


@pytest.mark.parametrize("backend", [pytest.param("ffcv", marks=pytest.mark.slow), "torch"])  # FFCV compiles its pipeline: seconds
def test_training_loaders_never_serve_the_holdout(data_dir, backend):
    """The actual loaders: train (shuffled, augmented, sharded over 2 ranks) and holdout are disjoint, and
    together they are the whole train split; the holdout is served in order, without augmentation."""
    split = dict(holdout=0.2, holdout_seed=7)
    kw = dict(batch_size=8, resolution=16, augment="cifar", seed=5, return_indices=True, backend=backend,
              num_workers=1 if backend == "ffcv" else 0)
    kept, held = split_train(data_dir, **{"holdout": 0.2, "seed": 7})
    hold = make_loader(data_dir, "holdout", **kw, **split)
    got_held = _indices(hold)
    assert np.array_equal(got_held, held) and len(hold) == -(-len(held) // 8)  # in order, nothing dropped
    train = make_loader(data_dir, "train", drop_last=False, **kw, **split)
    for epoch in (0, 1):
        seen = _indices(train, epoch)
        assert sorted(seen) == sorted(kept) and not set(seen) & set(got_held)
    # Augmentation is off on the holdout: its pixels are the val-style decode of the same images.
    plain = make_loader(data_dir, "train", shuffle=False, drop_last=False, augment="none",
                        **{k: v for k, v in kw.items() if k != "augment"})
    plain.set_epoch(0)
    x_all = torch.cat([b[0] for b in plain])
    hold.set_epoch(3)
    x_held = torch.cat([b[0] for b in hold])
    torch.testing.assert_close(x_held, x_all[held], rtol=0, atol=1e-5)
    # Sharded over two ranks (what DDP workers do): disjoint shards, none touching the holdout.
    from kesi_dist.data.image_loader import ImageLoader

    for rank in (0, 1):
        shard = ImageLoader.order(_ranked(train, rank), 0)
        assert not set(shard) & set(held)


def _ranked(loader, rank):
    """The loader's order as rank `rank` of 2 would see it (same subset, same seed)."""
    import copy

    other = copy.copy(loader)
    other.rank, other.world_size, other.window = rank, 2, None
    return other


def test_no_holdout_means_the_whole_train_split(data_dir):
    ld = make_loader(data_dir, "train", batch_size=8, resolution=16, backend="torch", num_workers=0,
                     shuffle=False, drop_last=False, return_indices=True)
    assert sorted(_indices(ld)) == list(range(N_TRAIN))
    with pytest.raises(BadValue, match="holdout"):
        make_loader(data_dir, "holdout", batch_size=8, resolution=16, backend="torch", num_workers=0)


def test_describe_records_size_and_hash(data_dir):
    d = describe_holdout(data_dir, 2, seed=0)
    assert d["size"] == 2 * CLASSES and d["train_size"] == N_TRAIN - 2 * CLASSES and d["per_class"] == [2, 2]
    assert d["sha256"] == describe_holdout(data_dir, 2, seed=0)["sha256"] != describe_holdout(data_dir, 2, seed=1)["sha256"]
    assert describe_holdout(data_dir, 0, seed=0)["size"] == 0


def test_config_names_a_malformed_holdout():
    from pathlib import Path

    from kesi_dist.config import load_config
    from kesi_dist.errors import UsageError

    smoke = Path(__file__).resolve().parents[2] / "configs" / "kesi" / "smoke.yaml"
    assert load_config(smoke).data.holdout == 0.1  # on by default
    assert load_config(smoke, ["data.holdout=5"]).data.holdout == 5
    for bad in ("2.5", "-1"):
        with pytest.raises(UsageError, match=r"smoke.yaml: data.holdout: "):
            load_config(smoke, [f"data.holdout={bad}"])


def test_protocol_block_says_which_split_selected():
    from kesi_dist.report import protocol, protocol_line

    held = {"stages": {"data": {"holdout": {"holdout": 0.1, "size": 143, "sha256": "ab"}}}}
    p = protocol(held)
    assert p == {"selection": "holdout", "holdout_size": 143, "reported_on": "test", "holdout": 0.1,
                 "holdout_sha256": "ab"}
    none = protocol({"stages": {"data": {"holdout": {"holdout": 0, "size": 0}}}})
    assert none == {"selection": "test", "holdout_size": 0, "reported_on": "test"}
    assert "optimistic" in protocol_line({"protocol": none}) and "143 training images" in protocol_line({"protocol": p})
