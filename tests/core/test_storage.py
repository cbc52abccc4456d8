"""Run storage on pyarrow URIs: kesi_dist.storage on file://, an in-memory mock:// filesystem and a real
S3-compatible server on loopback (s3://, tests/s3server.py); checkpoints, manifest, run-directory rules,
TensorBoard and loaders through URIs. A whole `kesi run` on s3://, interrupted and resumed: tests/e2e/test_signals.py."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from kesi_dist import storage
from kesi_dist.errors import RunError, UsageError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def mockfs():
    """pyarrow's in-memory filesystem, served as mock:// (in this process only)."""
    import pyarrow.fs as pafs

    fs = pafs._MockFileSystem(datetime.datetime.now())
    storage.register_filesystem("mock", fs)
    yield fs
    storage._REGISTERED.pop("mock", None)


@pytest.fixture(params=["file", "mock", "s3"])
def root(request, tmp_path):
    """A storage URI of an empty folder: on the local disk (file://), in memory (mock://), or on a real
    S3-compatible server on loopback (s3://, the `s3` fixture; the URI's query string names the server)."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if request.param == "s3":
        return request.getfixturevalue("s3").uri("store")
    request.getfixturevalue("mockfs")
    return "mock://bucket/store"


def _under(uri: str, rel: str) -> str:
    """`uri/rel` spelled out by hand, before the URI's query string (what storage.join must give)."""
    base, mark, query = uri.partition("?")
    return f"{base}/{rel}{mark}{query}"


def _leftovers(uri: str) -> list[str]:
    """Every temp file anywhere under `uri` (none may survive an atomic write)."""
    import pyarrow.fs as pafs

    fs, p = storage.storage_fs(uri)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.base_name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------
# storage.py

def test_read_write_list_on_uris(root):
    f = storage.join(root, "a", "b.txt")
    assert f == _under(root, "a/b.txt") and storage.basename(f) == "b.txt" and not storage.exists(f)
    storage.write_text(f, "hello")
    storage.write_bytes(storage.join(root, "a", "c.bin"), b"\x00\x01")
    storage.write_text(f, "hello again")  # replaces
    assert storage.read_text(f) == "hello again" and storage.size(f) == 11
    assert storage.is_file(f) and storage.is_dir(storage.join(root, "a")) and not storage.is_file(_under(root, "a"))
    assert storage.listdir(storage.join(root, "a")) == ["b.txt", "c.bin"]
    assert storage.listdir(storage.join(root, "nothing")) == []
    assert _leftovers(root) == []
    storage.remove(f)
    assert not storage.exists(f)
    with pytest.raises(FileNotFoundError, match="b.txt"):
        storage.read_bytes(f)


def test_failed_write_keeps_the_old_file(root):
    f = storage.join(root, "x.pt")
    storage.write_bytes(f, b"old")

    def boom(out):
        out.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_file(f, boom)
    assert storage.read_bytes(f) == b"old" and _leftovers(root) == []


class _SlowSource:
    """A source filesystem for `copy_file(src_fs=...)` whose file comes in two chunks: after the first it
    waits for `go`, then hands out the second, or fails as a dropped connection would (`fail`)."""

    type_name = "test-source"

    def __init__(self, fail: bool):
        self.fail, self.halfway, self.go = fail, threading.Event(), threading.Event()
        self.chunks = [b"new-" * 1000, b"rest" * 1000]

    @contextlib.contextmanager
    def open_input_stream(self, path):
        yield self

    def read(self, n: int) -> bytes:
        if len(self.chunks) == 1:
            self.halfway.set()
            assert self.go.wait(60)
            if self.fail:
                raise OSError("connection reset by peer")
        return self.chunks.pop(0) if self.chunks else b""


@pytest.mark.parametrize("fail", [False, True], ids=["completes", "fails"])
def test_a_write_is_seen_whole_or_not_at_all(root, fail):
    """Halfway through a streamed write, the folder lists the old object (on S3 nothing else) and reads
    give its old content; a write that fails there leaves the old object and no temp object."""
    folder = storage.join(root, "d")
    f = storage.join(folder, "x.pt")
    storage.write_bytes(f, b"old")
    src, errors = _SlowSource(fail), []

    def copy():
        try:
            storage.copy_file("x", f, src_fs=src)
        except OSError as e:
            errors.append(e)

    writer = threading.Thread(target=copy)
    writer.start()
    try:
        assert src.halfway.wait(60)
        names = storage.listdir(folder)
        assert [n for n in names if not n.startswith(".")] == ["x.pt"]  # file://, mock://: a hidden temp name
        assert names == ["x.pt"] or not root.startswith("s3://")
        assert storage.read_bytes(f) == b"old" and storage.size(f) == 3
    finally:
        src.go.set()
        writer.join(60)
    assert storage.listdir(folder) == ["x.pt"] and _leftovers(root) == []
    if fail:
        assert "connection reset" in str(errors[0]) and storage.read_bytes(f) == b"old"
    else:
        assert not errors and storage.read_bytes(f) == b"new-" * 1000 + b"rest" * 1000


def test_copy_upload_and_staged_dir(root, tmp_path):
    local = tmp_path / "logs"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "events.1").write_bytes(b"e1")
    (local / "top.txt").write_text("t")
    storage.upload_dir(local, storage.join(root, "tb"))
    assert storage.read_bytes(storage.join(root, "tb", "sub", "events.1")) == b"e1"
    storage.copy_file(storage.join(root, "tb", "top.txt"), storage.join(root, "copy", "top.txt"))
    storage.copy_file(storage.join(root, "copy", "top.txt"), str(tmp_path / "back.txt"))  # URI -> local
    assert (tmp_path / "back.txt").read_text() == "t"
    with storage.staged_dir(storage.join(root, "staged")) as d:
        Path(d, "f").write_text("staged")
        assert not storage.exists(storage.join(root, "staged", "f"))  # uploaded when the block ends
    assert storage.read_text(storage.join(root, "staged", "f")) == "staged" and not Path(d).exists()


def test_local_copy_is_cached_per_version(root, tmp_path):
    cache = tmp_path / "cache"
    src = storage.join(root, "data")
    storage.write_bytes(storage.join(src, "train.beton"), b"x" * 100)
    storage.write_text(storage.join(src, "meta.json"), "{}")
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(storage.local_copy(src, cache))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and sorted(os.listdir(paths[0])) == ["meta.json", "train.beton"]
    copies = [p for p in os.listdir(cache) if not p.endswith(".lock")]
    assert len(copies) == 1  # four concurrent callers, one download
    assert Path(paths[0], "train.beton").read_bytes() == b"x" * 100
    storage.write_bytes(storage.join(src, "train.beton"), b"y" * 50)  # a new version: a new copy
    fresh = storage.local_copy(src, cache)
    assert fresh != paths[0] and Path(fresh, "train.beton").read_bytes() == b"y" * 50
    single = storage.local_copy(storage.join(src, "meta.json"), cache)
    assert Path(single).read_text() == "{}"
    assert storage.local_copy(str(tmp_path), cache) == str(tmp_path)  # local paths are used in place
    with pytest.raises(FileNotFoundError):
        storage.local_copy(storage.join(root, "missing"), cache)


def test_bad_uri_is_a_usage_error():
    with pytest.raises(UsageError, match="nosuch://x"):
        storage.storage_fs("nosuch://x/y")


# ------------------------------------------------------------------------------------------------
# checkpoints, manifest, run directory, TensorBoard

def test_checkpoint_round_trip_and_refusal_via_uri(root, tmp_path):
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from kesi_dist.models import build_model
    from kesi_dist.pruning import apply_masks, mwp_masks
    from tests.core.test_checkpoint import FORMAT, _Evil

    torch.manual_seed(0)
    model = build_model("resnet20", 5)
    masks = mwp_masks(model, 0.5)
    apply_masks(model, masks)
    path = storage.join(root, "snapshots", "m.pt")
    save_checkpoint(path, model, masks, metrics={"val_acc": 0.5})
    assert _leftovers(root) == []
    rebuilt, rmasks = model_from_checkpoint(load_checkpoint(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x)) and set(rmasks) == set(masks)
    marker = tmp_path / "pwned"
    local = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "arch": "resnet20", "evil": _Evil(marker)}, local)
    storage.upload_file(local, storage.join(root, "evil.pt"))
    with pytest.raises(RunError, match=r"evil\.pt\S*: refused to load.*unsupported global: GLOBAL io\.open"):
        load_checkpoint(storage.join(root, "evil.pt"))
    assert not marker.exists()
    with pytest.raises(RunError, match=r"nope\.pt\S*: no such checkpoint file"):
        load_checkpoint(storage.join(root, "nope.pt"))
    storage.write_bytes(storage.join(root, "trunc.pt"), storage.read_bytes(path)[:500])
    with pytest.raises(RunError, match=r"trunc\.pt\S*: not a readable checkpoint"):
        load_checkpoint(storage.join(root, "trunc.pt"))


def test_manifest_on_a_uri(root):
    from kesi_dist.runs.manifest import Manifest

    path = storage.join(root, "run", "manifest.json")
    m = Manifest.create(path, "fp")
    m.start_stage("baseline")
    m.add_snapshot("baseline", {"checkpoint": "snapshots/baseline.pt"})
    m.finish_stage("baseline")
    again = Manifest.load(path)
    assert again.is_complete("baseline") and again.snapshots["baseline"]["checkpoint"] == "snapshots/baseline.pt"
    assert [e["event"] for e in again.data["events"]] == ["start baseline", "snapshot baseline", "complete baseline"]
    assert _leftovers(root) == []
    storage.write_text(path, "{not json")
    with pytest.raises(RunError, match=r"manifest\.json\S*: corrupt manifest"):
        Manifest.load(path)


def test_open_run_rules_hold_on_uris(root):
    from kesi_dist.config import load_config
    from kesi_dist.runs.rundir import open_run

    cfg = load_config(str(ROOT / "configs" / "kesi" / "smoke.yaml")).model_dump(mode="json")
    out = storage.join(root, "run")
    with pytest.raises(UsageError, match="no run to resume there"):
        open_run(out, cfg, resume=True)
    run, manifest = open_run(_under(out, ""), cfg, resume=False)  # a trailing '/' is dropped
    assert run.root == out and run.snapshot("baseline") == _under(out, "snapshots/baseline.pt")
    assert storage.listdir(out) == ["config.yaml", "manifest.json"]
    with pytest.raises(UsageError, match="already holds a running run"):
        open_run(out, cfg, resume=False)
    other = load_config(str(ROOT / "configs" / "kesi" / "smoke.yaml"), ["prune.iterations=3"]).model_dump(mode="json")
    with pytest.raises(UsageError, match=r"different config \(changed: method.prune.iterations\)"):
        open_run(out, other, resume=True)
    run2, m2 = open_run(out, cfg, resume=True)
    assert m2.data["events"][-1]["event"] == "resume"
    storage.write_text(storage.join(root, "notarun", "x.txt"), "x")
    with pytest.raises(UsageError, match="not a kesi_dist run"):
        open_run(storage.join(root, "notarun"), cfg, resume=False)
    assert storage.listdir(storage.join(root, "notarun")) == ["x.txt"]  # nothing touched


def test_soft_label_cache_on_a_uri(root):
    import numpy as np

    from kesi_dist.distill.shards import save_npy
    from kesi_dist.distill.soft_label_cache import FORMAT, SoftLabelCache

    out = storage.join(root, "soft_labels")
    n, k = 8, 2
    arrays = {"samples": np.arange(n, dtype=np.int64)[::-1].copy(),
              "values": np.random.default_rng(0).random((n, k), dtype=np.float32),
              "indices": np.tile(np.arange(k, dtype=np.int16), (n, 1))}
    files = {kind: save_npy(storage.join(out, f"abc-e0000-s000-{kind}.npy"), a) for kind, a in arrays.items()}
    meta = {"format": FORMAT, "epochs": 1, "num_classes": 4, "train_size": n, "topk_stored": k, "seed": 0,
            "resolution": 16, "augment": "none", "shards": [{"epoch": 0, "shard": 0, "files": files}]}
    storage.write_text(storage.join(out, "meta.json"), json.dumps(meta))
    assert _leftovers(root) == []
    values, classes = SoftLabelCache(out).lookup(0, torch.tensor([7, 0]))
    assert torch.equal(values, torch.from_numpy(arrays["values"][[0, 7]])) and classes.shape == (2, k)
    shard = storage.join(out, "abc-e0000-s000-values.npy")
    storage.write_bytes(shard, storage.read_bytes(shard)[:-4])
    with pytest.raises(RunError, match=r"abc-e0000-s000-values\.npy\S*: soft-label shard is truncated"):
        SoftLabelCache(out).lookup(0, torch.arange(n))


def test_tensorboard_writer_uploads_to_a_uri(root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kesi_dist.storage import local_copy
    from kesi_dist.train.tensorboard import ScalarWriter

    logdir = storage.join(root, "tensorboard", "baseline")
    w = ScalarWriter(logdir)
    w.scalars({"val/acc": 0.5}, step=1)
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(logdir))  # uploaded on flush
    w.scalars({"val/acc": 0.75}, step=2)
    local = w._local
    w.close()
    assert not os.path.exists(local)
    acc = EventAccumulator(local_copy(logdir, os.path.join(os.path.dirname(local), "kesi-tb-check")))
    acc.Reload()
    assert [e.value for e in acc.Scalars("val/acc")] == [0.5, 0.75]


def test_prepared_data_is_uploaded_meta_last(mockfs, tiny_data, capsys, monkeypatch):
    """The upload half of `prepare_dataset(out=URI)` (the whole of it runs in the `kesi run` test below)."""
    import shutil

    from kesi_dist.data.loaders import read_meta
    from kesi_dist.data.prepare import _prepare_remote

    out, order = "mock://bucket/data", []
    real_upload = storage.upload_file

    def upload(src, dst):
        order.append(os.path.basename(dst))
        real_upload(src, dst)

    def prepare(local):  # stands in for the FFCV writer: the files it would write
        for name in ("train.beton", "val.beton", "meta.json"):
            shutil.copy(os.path.join(tiny_data, name), local)
        return read_meta(local)

    fingerprint = read_meta(tiny_data)["fingerprint"]
    monkeypatch.setattr(storage, "upload_file", upload)
    meta = _prepare_remote(out, fingerprint, prepare)
    assert order == ["train.beton", "val.beton", "meta.json"]  # the folder looks complete only at the end
    assert read_meta(out) == meta == read_meta(tiny_data) and _leftovers(out) == []
    assert _prepare_remote(out, fingerprint, prepare) == meta and len(order) == 3  # up to date: no upload
    assert "up to date" in capsys.readouterr().err


def test_loaders_read_a_uri_through_the_node_local_cache(tiny_data, tmp_path, monkeypatch):
    from kesi_dist.data.loaders import make_loader, read_meta

    cache = tmp_path / "cache"
    monkeypatch.setenv("KESI_CACHE_DIR", str(cache))
    uri = f"file://{tiny_data}"
    assert read_meta(uri) == read_meta(tiny_data)
    # The torch backend reads the same .beton files and skips FFCV's compile step (slow to start).
    kw = dict(batch_size=256, resolution=16, augment="cifar", backend="torch", num_workers=0, seed=3)
    remote, local = make_loader(uri, "train", **kw), make_loader(tiny_data, "train", **kw)
    make_loader(uri, "val", **kw)
    copies = [p for p in os.listdir(cache) if not p.endswith(".lock")]
    assert len(copies) == 1 and str(remote.data_dir).startswith(str(cache))  # one copy for both splits
    batches = 0
    for (xa, ya), (xb, yb) in zip(remote, local):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        batches += 1
    assert batches == len(local) > 0
    with pytest.raises(RunError, match="meta.json: missing"):
        read_meta(f"file://{tmp_path}/nodata")


@pytest.mark.parametrize("root", ["file", "s3"], indirect=True)  # mock:// lives in this process only (Ray tasks)
def test_training_resumes_from_checkpoints_on_a_uri(root, tiny_data, tmp_path, monkeypatch):
    """run_training with storage, data, TensorBoard and final checkpoint all on URIs: a run that fails in
    epoch 1 resumes from the epoch-0 checkpoint it left there. On S3, where a folder cannot be renamed
    into place, a checkpoint folder counts once its marker is written last: one cut short is ignored."""
    from kesi_dist.checkpoint import load_checkpoint
    from kesi_dist.runtime import InjectedFailure, run_training
    from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec

    monkeypatch.setenv("KESI_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(model=ModelSpec("resnet20", num_classes=4), engine=EngineSpec(num_workers=0),
              loader=LoaderSpec(f"file://{tiny_data}", batch_size=64, resolution=16, backend="torch", num_workers=0),
              schedule=ScheduleSpec(epochs=2, lr=0.05), storage_path=storage.join(root, "train"), name="r",
              progress=False, max_steps_per_epoch=2, tensorboard_dir=storage.join(root, "tensorboard", "r"))
    with pytest.raises(InjectedFailure):
        run_training(**kw, inject_failure_at_epoch=1)
    folder = storage.join(root, "train", "r")
    assert storage.listdir(folder) == [".kesi_injected_failure_epoch1", "checkpoint_000000"]
    if root.startswith("s3://"):
        assert storage.listdir(storage.join(folder, "checkpoint_000000"))[0] == storage.PUBLISHED
        # epoch 1's folder as a kill in the middle of its upload leaves it: files, no marker
        (tmp_path / "cut").mkdir()
        (tmp_path / "cut" / "model.pt").write_bytes(b"half")
        storage.upload_dir(tmp_path / "cut", storage.join(folder, "checkpoint_000001"))
    final = storage.join(root, "snapshots", "r.pt")
    resumed = run_training(**kw, inject_failure_at_epoch=1, resume=True, final_checkpoint=final)
    assert resumed.started == [1] and [m["epoch"] for m in resumed.history] == [0, 1]
    assert load_checkpoint(final)["metrics"]["epoch"] == 1
    assert storage.published(storage.join(folder, "checkpoint_000001"))  # rewritten whole
    assert len([n for n in storage.listdir(storage.join(root, "tensorboard", "r")) if n.startswith("events.out")]) == 2
    assert _leftovers(root) == []
