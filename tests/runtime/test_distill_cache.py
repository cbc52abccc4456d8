"""Teacher ensemble, cached soft labels on a real Ray actor pool, and both teacher sources in the training loop.

Real files throughout: teachers are kesi_dist checkpoints (one unpruned ResNet-20, PFEC-pruned and
MWP-masked snapshots of it), images come from the `tiny_data` .beton files through the real
loaders, the soft-label pass runs on the session's local Ray (`ray_local`, 2 CPUs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kesi_dist.checkpoint import load_checkpoint, save_checkpoint
from kesi_dist.data.loaders import make_loader
from kesi_dist.distill import (
    CachedSoftLabels, OnlineTeachers, SoftLabelCache, dense_from_topk, ensemble_probs, evaluate_ensemble, kd_loss,
    load_teachers, truncation_bound,
)
from kesi_dist.stages.soft_labels import build_soft_label_cache
from kesi_dist.errors import RunError, UsageError
from kesi_dist.models import build_model
from kesi_dist.pruning import apply_masks, conv_weights, mwp_masks, pfec_prune
from kesi_dist.train import Distillation, build_optimizer, train_epoch

CLASSES, SEED, RES, T = 4, 3, 16, 2.0


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> list[str]:
    """Baseline + 2 PFEC iterations + an MWP-masked copy: different architectures, all 4-class."""
    d = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    model, paths = build_model("resnet20", CLASSES), []
    for i in range(3):
        paths.append(str(d / f"pfec{i}.pt"))
        save_checkpoint(paths[-1], model, metrics={"val_acc": 0.5})
        model = pfec_prune(model, [0.2, 0.3, 0.4])
    masks = mwp_masks(model, 0.5)
    apply_masks(model, masks)
    paths.append(str(d / "mwp.pt"))
    save_checkpoint(paths[-1], model, masks)
    return paths


@pytest.fixture(scope="module")
def full_cache(ray_local, tiny_data, teacher_files, tmp_path_factory) -> tuple[str, dict]:
    """The pass over 2 epochs, all classes kept (exact), on 2 actors."""
    out = str(tmp_path_factory.mktemp("cache") / "soft")
    meta = build_soft_label_cache(teacher_files, tiny_data, out, epochs=2, seed=SEED, batch_size=128,
                                  resolution=RES, augment="cifar", temperature=T, topk=CLASSES, num_actors=2)
    return out, meta


def _student_loader(data, **kw):
    return make_loader(data, "train", batch_size=kw.pop("batch_size", 64), resolution=RES, augment="cifar",
                       seed=SEED, num_workers=1, return_indices=True, **kw)


# --- ensemble ------------------------------------------------------------------------------------

def test_load_teachers_frozen_with_their_own_architectures_and_masks(teacher_files, tmp_path):
    teachers = load_teachers(teacher_files)
    assert [t.widths for t in teachers][0] != teachers[1].widths  # pruned archs rebuilt from the files
    for t in teachers:
        assert not t.training and all(not p.requires_grad for p in t.parameters())
        assert type(t).__name__ == "CifarResNet"  # bare modules, never wrapped
    # MWP masks re-applied on load: a file whose masked weights are not zero (as if edited or written by
    # a buggy save) still gives a teacher with exactly the masked half of its conv weights at zero.
    masks = load_checkpoint(teacher_files[-1])["masks"]
    tampered = teachers[-1]
    with torch.no_grad():
        for k, m in masks.items():
            conv_weights(tampered)[k][m == 0] = 1.0
    save_checkpoint(tmp_path / "tampered.pt", tampered, masks)
    (masked,) = load_teachers([str(tmp_path / "tampered.pt")])
    convs = conv_weights(masked)
    assert set(masks) == set(convs)
    assert all((convs[k][m == 0] == 0).all() and (convs[k][m != 0] != 0).all() for k, m in masks.items())
    total = sum(w.numel() for w in convs.values())
    assert sum(int((w == 0).sum()) for w in convs.values()) / total == pytest.approx(0.5, abs=0.5 / total)


def test_load_teachers_refuses_bad_input(teacher_files, tmp_path):
    with pytest.raises(UsageError, match="at least one"):
        load_teachers([])
    with pytest.raises(RunError, match="no such checkpoint"):
        load_teachers([str(tmp_path / "nope.pt")])
    other = tmp_path / "ten.pt"
    save_checkpoint(other, build_model("resnet20", 10))
    with pytest.raises(RunError, match="ten.pt: teacher has 10 classes"):
        load_teachers([teacher_files[0], str(other)])


def test_ensemble_probs_and_accuracy_match_a_manual_computation(tiny_data, teacher_files):
    teachers = load_teachers(teacher_files)
    val = make_loader(tiny_data, "val", batch_size=100, resolution=RES, num_workers=1)
    res = evaluate_ensemble(teachers, val)
    images, labels = [], []
    for x, y in make_loader(tiny_data, "val", batch_size=100, resolution=RES, num_workers=1):
        images.append(x)
        labels.append(y)
    x, y = torch.cat(images), torch.cat(labels)
    with torch.no_grad():
        logits = [t(x) for t in teachers]
    p1 = ensemble_probs(teachers, x, 1.0)
    assert torch.allclose(p1, torch.stack([F.softmax(z, 1) for z in logits]).mean(0), atol=1e-6)
    assert torch.allclose(ensemble_probs(teachers, x, T), torch.stack([F.softmax(z / T, 1) for z in logits]).mean(0),
                          atol=1e-6)
    assert res["count"] == 256 and res["predictions"].shape == (4, 256) and res["predictions"].dtype == torch.int64
    assert torch.equal(res["predictions"], torch.stack([z.argmax(1) for z in logits]))
    assert res["member_acc"] == pytest.approx([float((z.argmax(1) == y).float().mean()) for z in logits])
    assert res["acc"] == pytest.approx(float((p1.argmax(1) == y).float().mean()))


# --- the cached pass -----------------------------------------------------------------------------

@pytest.mark.slow
def test_pass_splits_work_across_two_actors_and_covers_every_pair_once(full_cache, tiny_data):
    out, meta = full_cache
    assert meta["reused"] is False and meta["num_actors"] == 2
    actors = {a["actor"]: a for a in meta["actors"]}  # the actors that computed units
    assert 1 <= len(actors) <= 2 and len({a["pid"] for a in actors.values()}) == len(actors)
    assert meta["batches_per_epoch"] == 8 and meta["train_size"] == 1024
    # Units go to whichever actor is free (an actor that came up late may get none: the pool does not
    # wait for it; tests/runtime/test_actor_pool.py shows the split): every batch of every epoch was
    # computed exactly once, by a recorded actor.
    assert {s["actor_id"] for s in meta["shards"]} == {a["actor_id"] for a in actors.values()}
    for epoch in range(2):
        shards = [s for s in meta["shards"] if s["epoch"] == epoch]
        seen, batches = [], []
        for s in shards:
            assert s["count"] > 0 and s["batches"]
            assert s["actor_id"] == actors[s["actor"]]["actor_id"]
            samples = np.load(Path(out) / s["files"]["samples"]["name"], allow_pickle=False)
            assert len(samples) == s["count"] == meta["batch_size"] * len(s["batches"])
            seen.append(samples)
            batches += s["batches"]
        assert sorted(batches) == list(range(8))
        allsamples = np.concatenate(seen)
        assert len(allsamples) == 1024 and np.array_equal(np.sort(allsamples), np.arange(1024))
    assert meta["timings"]["pass_s"] > 0
    assert all(0 < s["teacher_cpu_s"] and 0 < s["teacher_s"] <= s["compute_s"] for s in meta["shards"])
    assert set(shards[0]["files"]) == {"samples", "values", "indices"}


@pytest.mark.slow
def test_unchanged_teachers_and_data_reuse_the_cache(full_cache, tiny_data, teacher_files):
    out, meta = full_cache
    again = build_soft_label_cache(teacher_files, tiny_data, out, epochs=2, seed=SEED, batch_size=64,
                                   resolution=RES, augment="cifar", temperature=T, topk=CLASSES, num_actors=1)
    assert again["reused"] is True and again["key"] == meta["key"]
    assert again["shards"] == meta["shards"]  # nothing recomputed (batch size and actors do not change labels)


@pytest.mark.slow
def test_cached_and_online_kd_give_the_same_loss_on_the_same_batch(full_cache, tiny_data, teacher_files):
    """A student-side loader with another batch size, shuffled: labels are keyed by (epoch, sample index)."""
    out, _ = full_cache
    cache = SoftLabelCache(out)
    cache.check(seed=SEED, resolution=RES, augment="cifar", epochs=2)
    online = OnlineTeachers(load_teachers(teacher_files), temperature=T, num_classes=CLASSES)
    cached = CachedSoftLabels(cache, temperature=T, num_classes=CLASSES)
    g = torch.Generator().manual_seed(0)
    worst, batches = 0.0, 0
    for backend in ("ffcv", "torch"):
        loader = _student_loader(tiny_data, backend=backend)
        for epoch in (1, 0):
            loader.set_epoch(epoch)
            online.set_epoch(epoch)
            cached.set_epoch(epoch)
            for b, (x, y, idx) in enumerate(loader):
                if b >= 4:
                    break
                logits = 3 * torch.randn(len(y), CLASSES, generator=g)
                a = kd_loss(logits, online.probs(x, idx), y, temperature=T)
                c = kd_loss(logits, cached.probs(x, idx), y, temperature=T)
                assert a["kd_loss"].item() > 1e-3
                worst = max(worst, abs(a["kd_loss"].item() - c["kd_loss"].item()))
                batches += 1
    assert batches == 16
    assert worst < 1e-5, worst  # exact up to float rounding (batch composition differs in the pass)


@pytest.mark.slow
def test_truncated_cache_stays_within_the_stated_bound(ray_local, tiny_data, teacher_files, tmp_path):
    meta = build_soft_label_cache(teacher_files, tiny_data, str(tmp_path / "k2"), epochs=1, seed=SEED,
                                  batch_size=256, resolution=RES, augment="cifar", temperature=T, topk=2,
                                  num_actors=1, values_dtype="float16", backend="torch", loader_workers=0)
    assert meta["topk_stored"] == 2 and meta["num_actors"] == 1
    vals = np.load(tmp_path / "k2" / meta["shards"][0]["files"]["values"]["name"], allow_pickle=False)
    idx = np.load(tmp_path / "k2" / meta["shards"][0]["files"]["indices"]["name"], allow_pickle=False)
    assert vals.dtype == np.float16 and idx.dtype == np.int16 and vals.shape == (meta["shards"][0]["count"], 2)
    assert sum(s["count"] for s in meta["shards"]) == 1024
    cache = SoftLabelCache(tmp_path / "k2")
    teachers = load_teachers(teacher_files)
    online = OnlineTeachers(teachers, temperature=T, num_classes=CLASSES)
    cached = CachedSoftLabels(cache, temperature=T, num_classes=CLASSES)
    loader = _student_loader(tiny_data)
    loader.set_epoch(0)
    online.set_epoch(0)
    cached.set_epoch(0)
    g = torch.Generator().manual_seed(1)
    for x, y, i in loader:
        logits = 3 * torch.randn(len(y), CLASSES, generator=g)
        gap = abs(kd_loss(logits, online.probs(x, i), y, temperature=T)["kd_loss"].item()
                  - kd_loss(logits, cached.probs(x, i), y, temperature=T)["kd_loss"].item())
        v, c = cache.lookup(0, i)
        # float16 storage: values are off by <= 1e-3 relative, which moves the loss by at most ~T^2 * 1e-3
        assert gap <= truncation_bound(logits, v, c, temperature=T).item() + T * T * 2e-3, gap
        full = ensemble_probs(teachers, x, T)
        assert torch.equal(c, full.topk(2, 1).indices.to(c))
    with pytest.raises(RunError, match="covers epochs 0..0"):
        cache.lookup(1, torch.tensor([0]))


@pytest.mark.slow
def test_corrupt_shard_is_detected_and_rebuilt_identically_with_either_loader(full_cache, tiny_data, teacher_files, tmp_path):
    out, meta = full_cache
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = copy / meta["shards"][1]["files"]["values"]["name"]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 7])  # truncated, as by a crash mid-copy
    cache = SoftLabelCache(copy)
    cache.lookup(1, torch.arange(10))  # other epoch: unaffected
    with pytest.raises(RunError, match="truncated or corrupt"):
        cache.lookup(0, torch.arange(10))
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(flipped))
    with pytest.raises(RunError, match="content hash differs"):
        SoftLabelCache(copy).lookup(0, torch.arange(10))
    # Rebuilt with the torch loader backend: the same pixels, so the same labels (and the same key).
    rebuilt = build_soft_label_cache(teacher_files, tiny_data, str(copy), epochs=2, seed=SEED, batch_size=128,
                                     resolution=RES, augment="cifar", temperature=T, topk=CLASSES, num_actors=2,
                                     backend="torch", loader_workers=0)
    assert rebuilt["reused"] is False and rebuilt["key"] == meta["key"]
    a, b = SoftLabelCache(out), SoftLabelCache(copy)
    for epoch in (0, 1):
        va, ia = a.lookup(epoch, torch.arange(1024))
        vb, ib = b.lookup(epoch, torch.arange(1024))
        assert torch.equal(ia, ib) and torch.allclose(va, vb, atol=1e-6)  # the pass is deterministic


def test_cache_refuses_bad_settings_and_missing_files(ray_local, tiny_data, teacher_files, tmp_path):
    kw = dict(epochs=1, seed=0, batch_size=64, resolution=RES, augment="cifar", temperature=T, topk=2, num_actors=1)
    with pytest.raises(UsageError, match="topk 0"):
        build_soft_label_cache(teacher_files, tiny_data, str(tmp_path / "c"), **{**kw, "topk": 0})
    with pytest.raises(UsageError, match="values_dtype"):
        build_soft_label_cache(teacher_files, tiny_data, str(tmp_path / "c"), **kw, values_dtype="int8")
    with pytest.raises(RunError, match="nope.pt: no such teacher"):
        build_soft_label_cache([str(tmp_path / "nope.pt")], tiny_data, str(tmp_path / "c"), **kw)
    with pytest.raises(RunError, match="meta.json: missing"):
        build_soft_label_cache(teacher_files, str(tmp_path), str(tmp_path / "c"), **kw)
    ten = tmp_path / "ten.pt"
    save_checkpoint(ten, build_model("resnet20", 10))
    with pytest.raises(RunError, match="ten.pt: teacher predicts 10 classes, the dataset .* has 4"):
        build_soft_label_cache([teacher_files[0], str(ten)], tiny_data, str(tmp_path / "c"), **kw)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="garbage.pt: (refused to load|not a readable checkpoint)"):
        build_soft_label_cache([str(garbage)], tiny_data, str(tmp_path / "c"), **kw)
    assert not (tmp_path / "c").exists()  # nothing started, nothing written
    with pytest.raises(RunError, match="meta.json: missing; the soft-label cache is not built"):
        SoftLabelCache(tmp_path / "c")


@pytest.mark.slow
def test_cache_check_and_source_guards(full_cache, tiny_data):
    out, _ = full_cache
    cache = SoftLabelCache(out)
    with pytest.raises(RunError, match="seed=3, the student uses 4"):
        cache.check(seed=4, resolution=RES, augment="cifar")
    with pytest.raises(RunError, match="cover 2 epochs, the student trains 5"):
        cache.check(seed=SEED, resolution=RES, augment="cifar", epochs=5)
    with pytest.raises(RunError, match="temperature"):
        CachedSoftLabels(cache, temperature=5.0, num_classes=CLASSES)
    source = CachedSoftLabels(cache, temperature=T, num_classes=CLASSES)
    x, y = torch.zeros(2, 3, RES, RES), torch.zeros(2, dtype=torch.long)
    with pytest.raises(RunError, match="set_epoch"):
        source.probs(x, torch.tensor([0, 1]))
    source.set_epoch(0)
    with pytest.raises(RunError, match="return_indices=True"):
        source.probs(x, None)
    task = Distillation(source, temperature=T)
    with pytest.raises(RunError, match="4 classes"):
        task(lambda images: torch.zeros(len(images), 10), x, y, torch.tensor([0, 1]))


# --- through the training loop -------------------------------------------------------------------

@pytest.mark.slow
def test_train_epoch_with_online_and_cached_teachers_follows_the_same_trajectory(full_cache, tiny_data, teacher_files):
    """The same student trained with either teacher source: same losses step for step (exact cache)."""
    out, _ = full_cache
    results = {}
    for mode in ("online", "cached"):
        torch.manual_seed(0)
        student = pfec_prune(build_model("resnet20", CLASSES), [0.5, 0.5, 0.5])
        if mode == "online":
            source = OnlineTeachers(load_teachers(teacher_files), temperature=T, num_classes=CLASSES)
        else:
            source = CachedSoftLabels(SoftLabelCache(out), temperature=T, num_classes=CLASSES)
        task = Distillation(source, temperature=T, alpha=0.5)
        loader = _student_loader(tiny_data, batch_size=128)
        opt = build_optimizer(student.parameters(), optimizer="adam", lr=1e-3, weight_decay=0)
        history = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            task.set_epoch(epoch)
            history.append(train_epoch(student, loader, opt, None, task=task))
        results[mode] = history
    for a, c in zip(results["online"], results["cached"]):
        assert a["steps"] == c["steps"] == 8
        for key in ("train/loss", "train/kd_loss", "train/task_loss"):
            assert c[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert a["train/loss"] == pytest.approx(0.5 * a["train/kd_loss"] + 0.5 * a["train/task_loss"], rel=1e-5)
    assert results["cached"][1]["train/loss"] < results["cached"][0]["train/loss"]


@pytest.mark.slow
def test_a_pass_with_a_holdout_never_labels_the_held_out_images(ray_local, tiny_data, teacher_files, tmp_path):
    """The student never trains on the holdout, so the pass leaves it out: every other image once per
    epoch, the held-out ones never; the key differs from the full pass's, and a student with another
    holdout is refused."""
    from kesi_dist.data.holdout import split_train

    out = str(tmp_path / "soft")
    meta = build_soft_label_cache(teacher_files[:2], tiny_data, out, epochs=1, seed=SEED, batch_size=128,
                                  resolution=RES, augment="cifar", temperature=T, topk=CLASSES, num_actors=1,
                                  holdout=0.1, holdout_seed=SEED)
    kept, held = split_train(tiny_data, 0.1, SEED)
    assert meta["holdout"]["indices"] == held.tolist() and meta["samples_per_epoch"] == len(kept) == 1024 - len(held)
    seen = np.concatenate([np.load(Path(out) / s["files"]["samples"]["name"]) for s in meta["shards"]])
    assert np.array_equal(np.sort(seen), kept)
    cache = SoftLabelCache(out)
    cache.check(seed=SEED, resolution=RES, augment="cifar", epochs=1, holdout=(0.1, SEED))
    values, _ = cache.lookup(0, torch.from_numpy(kept[:5]))
    assert torch.allclose(values.sum(1), torch.ones(5), atol=1e-5)  # every class kept: a whole distribution
    with pytest.raises(RunError, match="holdout 0.1"):
        cache.check(seed=SEED, resolution=RES, augment="cifar", epochs=1, holdout=(0, 0))
