"""Half-written files are never read as complete; a crash mid-write leaves the previous file intact.

Manifest, snapshots (kesi_dist.checkpoint), `.beton` + meta.json (kesi_dist.data.prepare) and
soft-label shards (kesi_dist.distill.shards) all go through kesi_dist.storage.atomic. Plain PyTorch, no Ray.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kesi_dist.storage import atomic
from kesi_dist.checkpoint import load_checkpoint, save_checkpoint
from kesi_dist.errors import RunError
from kesi_dist.models import build_model
from kesi_dist.runs.manifest import Manifest


class Crash(Exception):
    """Stands for the writer dying halfway (a bug, a kill, an OS error the writer does not expect)."""


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def half_then_crash(self, data):
    """Patched over kesi_dist.storage.atomic's file proxy: store half of the first chunk, then die."""
    self._f.write(data[: max(1, len(data) // 2)])
    raise Crash("writer died halfway")


# -- checkpoints ---------------------------------------------------------------------------------

def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "snap.pt"
    save_checkpoint(path, build_model("resnet20", 4))
    truncate(path)
    with pytest.raises(RunError) as err:
        load_checkpoint(path)
    assert "truncated or corrupt" in one_line_naming(err, path)


def test_checkpoint_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "snap.pt"
    save_checkpoint(path, build_model("resnet20", 4), metrics={"val/acc": 0.5})
    before = path.read_bytes()
    monkeypatch.setattr(atomic._Tracked, "write", half_then_crash)
    with pytest.raises(Crash):
        save_checkpoint(path, build_model("resnet20", 4), metrics={"val/acc": 0.9})
    assert path.read_bytes() == before and load_checkpoint(path)["metrics"] == {"val/acc": 0.5}
    assert not temp_files(tmp_path)


def test_disk_full_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "snap.pt"
    save_checkpoint(path, build_model("resnet20", 4))
    before = path.read_bytes()

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic._Tracked, "write", full)
    with pytest.raises(RunError) as err:  # torch.save re-raises ENOSPC as a RuntimeError; the reason survives
        save_checkpoint(path, build_model("resnet20", 4))
    assert "no space left" in one_line_naming(err, path)
    assert path.read_bytes() == before and not temp_files(tmp_path)


# -- manifest ------------------------------------------------------------------------------------

def test_truncated_manifest_is_refused(tmp_path):
    m = Manifest.create(tmp_path / "manifest.json", "abc")
    m.start_stage("baseline")
    truncate(m.path)
    with pytest.raises(RunError) as err:
        Manifest.load(m.path)
    assert "corrupt manifest" in one_line_naming(err, m.path)


def test_manifest_crash_mid_write_keeps_the_previous_state(tmp_path, monkeypatch):
    m = Manifest.create(tmp_path / "manifest.json", "abc")
    m.finish_stage("data", path="x")
    before = m.path.read_bytes()

    monkeypatch.setattr(atomic._Tracked, "write", half_then_crash)
    with pytest.raises(Crash):
        m.start_stage("baseline")
    assert m.path.read_bytes() == before
    assert Manifest.load(m.path).is_complete("data") and "baseline" not in Manifest.load(m.path).stages
    assert not temp_files(tmp_path)


# -- .beton + meta.json --------------------------------------------------------------------------

@pytest.fixture
def prepared(tiny_data, tmp_path):
    """A private copy of the session's prepared dataset (the tests damage it)."""
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    return out


def test_truncated_beton_is_refused(prepared):
    from kesi_dist.data.loaders import make_loader, read_meta

    beton = prepared / "train.beton"
    truncate(beton, 0.9)
    with pytest.raises(RunError) as err:
        read_meta(prepared)
    assert "truncated" in one_line_naming(err, beton)
    with pytest.raises(RunError) as err:
        make_loader(str(prepared), "train", batch_size=32, resolution=16, augment="none", backend="torch")
    one_line_naming(err, beton)


def test_beton_without_recorded_size_is_still_refused_when_truncated(prepared):
    """A dataset prepared before sizes were recorded: FFCV's own header check must catch it."""
    from kesi_dist.data.beton import BetonFile

    meta = json.loads((prepared / "meta.json").read_text())
    meta.pop("bytes", None)
    (prepared / "meta.json").write_text(json.dumps(meta))
    beton = prepared / "val.beton"
    truncate(beton, 0.02)  # header and part of the allocation table only
    with pytest.raises(RunError) as err:
        BetonFile(beton)
    one_line_naming(err, beton)


def test_prepare_crash_mid_write_keeps_the_previous_dataset(tmp_path, monkeypatch):
    from kesi_dist.data import prepare as prep
    from kesi_dist.data.loaders import read_meta

    out = tmp_path / "data"
    opts = dict(resolution=8, seed=0, workers=1, num_train=64, num_val=32, num_classes=2, difficulty=0.2)
    prep.prepare_dataset("synthetic", None, out, **opts)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.beton", "val.beton", "meta.json"}

    real = prep._write_beton

    def dies_on_val(split, path, errors_path, write_mode, workers, label):
        if label == "val.beton":
            Path(path).write_bytes(b"half a beton")
            raise Crash("writer died halfway")
        real(split, path, errors_path, write_mode, workers, label)

    monkeypatch.setattr(prep, "_write_beton", dies_on_val)
    with pytest.raises(Crash):
        prep.prepare_dataset("synthetic", None, out, **{**opts, "num_train": 96})  # another dataset
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old dataset complete, no temp file
    assert read_meta(out)["train_size"] == 64


# -- soft-label shards ---------------------------------------------------------------------------

def _write_cache(out: Path) -> None:
    """A one-epoch, one-shard cache written with the real shard writer (what build_soft_label_cache does
    per shard, minus the Ray actors that compute the arrays)."""
    from kesi_dist.distill.shards import save_npy
    from kesi_dist.distill.soft_label_cache import FORMAT

    n, k = 8, 2
    rng = np.random.default_rng(0)
    arrays = {"samples": np.arange(n, dtype=np.int64), "values": rng.random((n, k), dtype=np.float32),
              "indices": np.tile(np.arange(k, dtype=np.int16), (n, 1))}
    files = {kind: save_npy(out / f"abc-e0000-s000-{kind}.npy", a) for kind, a in arrays.items()}
    meta = {"format": FORMAT, "epochs": 1, "num_classes": 4, "train_size": n, "topk_stored": k, "seed": 0,
            "resolution": 16, "augment": "none", "shards": [{"epoch": 0, "shard": 0, "files": files}]}
    atomic.atomic_write_text(out / "meta.json", json.dumps(meta))


def test_truncated_soft_label_shard_is_refused(tmp_path):
    from kesi_dist.distill.soft_label_cache import SoftLabelCache

    _write_cache(tmp_path)
    values, _ = SoftLabelCache(tmp_path).lookup(0, torch.arange(8))
    assert values.shape == (8, 2)
    shard = tmp_path / "abc-e0000-s000-values.npy"
    truncate(shard)
    with pytest.raises(RunError) as err:
        SoftLabelCache(tmp_path).lookup(0, torch.arange(8))
    assert "truncated" in one_line_naming(err, shard)


def test_shard_crash_mid_write_keeps_the_previous_shard(tmp_path, monkeypatch):
    from kesi_dist.distill import shards
    from kesi_dist.distill import soft_label_cache as cache

    _write_cache(tmp_path)
    shard = tmp_path / "abc-e0000-s000-values.npy"
    before = shard.read_bytes()
    real_save = np.save

    def half(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY")  # the start of a header, then the writer dies
        raise Crash("writer died halfway")

    monkeypatch.setattr(cache.np, "save", half)
    with pytest.raises(Crash):
        shards.save_npy(shard, np.zeros((8, 2), np.float32))
    monkeypatch.setattr(cache.np, "save", real_save)
    assert shard.read_bytes() == before and not temp_files(tmp_path)
    values, _ = cache.SoftLabelCache(tmp_path).lookup(0, torch.arange(8))
    assert values.shape == (8, 2)


def test_temp_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "manifest.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".manifest.json.{atomic._HOST}.{int(dead.stdout)}.0badc0de.tmp"  # SIGKILLed mid-write
    live = tmp_path / f".manifest.json.{atomic._HOST}.{os.getppid()}.0badc0de.tmp"  # a writer still at work
    other = tmp_path / f".manifest.json.otherhost.{int(dead.stdout)}.0badc0de.tmp"  # shared folder, other node
    for p in (stale, live, other):
        p.write_text("half")
    atomic.atomic_write_text(path, "{}")
    assert path.read_text() == "{}" and not stale.exists() and live.exists() and other.exists()


def test_an_os_error_about_another_file_names_that_file(tmp_path):
    """An OSError raised inside the write for a file other than the target (a source that vanished under
    the writer) is reported with that file, not as if the target could not be written."""
    out = tmp_path / "train.beton"
    out.write_bytes(b"previous")
    gone = tmp_path / "job-workdir" / "source.npy"

    def write(f):
        f.write(b"partial")
        open(gone, "rb")  # noqa: SIM115 - raises FileNotFoundError naming `gone`

    with pytest.raises(RunError) as info:
        atomic.atomic_write(out, write)
    assert str(info.value) == f"{out}: cannot write it: no such file or directory: {gone}; nothing was replaced"
    assert out.read_bytes() == b"previous" and not list(tmp_path.glob(".*.tmp"))
