"""`kesi run` with its run folder on a real S3-compatible server (moto on loopback: the `s3` fixture,
tests/s3server.py), named as a user of MinIO would: `s3://bucket/...?endpoint_override=host:port&scheme=http`.

One run: its driver killed during the baseline once the first epoch checkpoint is on S3, `kesi status`
on the killed run, `--resume` on the same URI to the end, `kesi status` on the finished run, and every
artefact of the run on S3 (manifest, config, data, snapshots, soft labels, Ray Train/Tune state,
TensorBoard logs, report, model card), each snapshot registered once, no temp object left. The storage
primitives (reads, writes, listings, copies, atomic writes, checkpoints, manifest) run on this server in
tests/core/test_storage.py, whose `root` fixture includes s3://.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kesi_dist import storage
from tests.killing import _manifest, run_until

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")

pytestmark = pytest.mark.slow

# The smoke config shrunk to one iteration of one branch (and its fixed-LR arm), one epoch per stage
# except the baseline: the kill comes after its first epoch.
SETS = ("--set", "baseline.epochs=2", "--set", "retrain.epochs=1", "--set", "fixed_lr.epochs=1",
        "--set", "distill.epochs=1", "--set", "prune.iterations=1", "--set", "tune.branches=1")
EXPECTED = {"baseline", "iter1_b0", "iter1_fixed", "student"}


def _kesi(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kesi_dist.cli", *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=env)


def _objects(s3, run: str) -> list[str]:
    """Every object key under the run, relative to it, read from the server itself."""
    import pyarrow.fs as pafs

    _, prefix = storage.storage_fs(run)
    infos = s3.filesystem().get_file_info(pafs.FileSelector(prefix, recursive=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def _checkpoints(run: str, name: str) -> list[str]:
    """The epoch checkpoint folders of training run `name` that are whole (their marker is on S3)."""
    folder = storage.join(run, "train", name)
    return [n for n in storage.listdir(folder) if n.startswith("checkpoint_")
            and storage.published(storage.join(folder, n))]


@pytest.mark.timeout(1800)
def test_kesi_run_killed_resumed_and_read_on_s3(s3, tmp_path):
    run = s3.uri("run")
    env = {**os.environ, "KESI_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    # The driver's whole process group killed once the baseline's first epoch checkpoint is whole on S3.
    # The progress file (what `kesi status` reads below) is written by the driver after the checkpoint is
    # reported: wait for both, or a kill between the two leaves nothing in training to show.
    def epoch_1(r, m) -> bool:
        return bool(_checkpoints(r, "baseline")) and storage.is_file(storage.join(r, "progress", "baseline.json"))

    at_kill, _ = run_until(run, epoch_1, "baseline epoch 1", resume=False,
                           config=SMOKE, sets=SETS, logs=tmp_path, env=env)
    assert at_kill["stages"]["data"]["status"] == "complete" and not at_kill["snapshots"]
    last_done = max(int(n.split("_")[1]) for n in _checkpoints(run, "baseline")) + 1

    # kesi status reads the killed run from S3: the baseline was training, at its last recorded epoch.
    proc = _kesi("status", run, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    killed = json.loads(proc.stdout)
    assert killed["status"] == "running" and killed["run"] == run
    assert {s["stage"]: s["status"] for s in killed["stages"]} == {"data": "complete", "baseline": "running"}
    assert [(t["name"], t["epochs"]) for t in killed["training"]] == [("baseline", 2)]

    # --resume on the same URI: the baseline goes on after its last checkpoint, the run completes.
    done = _kesi("run", SMOKE, "--output", run, *SETS, "--resume", env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert f"baseline: resuming at epoch {last_done + 1} from its epoch-{last_done} checkpoint" in out, out[-4000:]
    final = _manifest(run)
    assert final["status"] == "complete" and set(final["snapshots"]) == EXPECTED
    events = [e["event"] for e in final["events"]]
    assert events.count("resume") == 1 and events[-1] == "run complete"
    for name in EXPECTED:
        assert events.count(f"snapshot {name}") == 1, name  # registered once
    assert final["stages"]["data"]["attempts"] == 1 and final["stages"]["baseline"]["attempts"] == 2
    assert final["stages"]["data"]["path"] == storage.join(run, "data")

    # Every artefact is an object on the server; no temp object and no half-published folder is left.
    keys = _objects(s3, run)
    assert {"manifest.json", "config.yaml", "report.json", "report.md", "accuracy_vs_macs.png", "MODEL_CARD.md",
            "data/train.beton", "data/val.beton", "data/meta.json", "soft_labels/meta.json"} <= set(keys)
    assert {s["checkpoint"] for s in final["snapshots"].values()} <= set(keys)
    for sub in ("baseline", "prune_1/iter1_b0", "prune_1/iter1_fixed", "distill", "report"):
        assert any(k.startswith(f"tensorboard/{sub}/events.out.tfevents") for k in keys), sub
    assert any(k.startswith("train/prune_1/tune/") for k in keys)  # Ray Tune's own state, through the URI
    folders = {k.rsplit("/", 1)[0] for k in keys if "/checkpoint_" in k}
    assert folders and all(f"{f}/{storage.PUBLISHED}" in keys for f in folders)
    assert not [k for k in keys if k.endswith(".tmp")]
    report = json.loads(storage.read_text(storage.join(run, "report.json")))
    assert report["student"]["val_acc"] is not None and report["ensemble"]["teachers"]
    # No URI was mistaken for a local path; every process used one node-local copy of the data.
    assert not (ROOT / "s3:").exists()
    assert len([p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock")]) == 1

    # kesi status on the finished run, from S3.
    proc = _kesi("status", run, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["status"] == "complete" and status["snapshots"] == len(EXPECTED) and not status["training"]
    assert all(s["status"] == "complete" for s in status["stages"])
    assert {r["row"]: r["val_acc"] for r in status["report_rows"]}["student"] == report["student"]["val_acc"]
    text = _kesi("status", run, env=env)
    assert text.returncode == 0 and f"{run}  ·  kesi  ·  resnet20  ·  complete" in text.stdout, text.stdout
