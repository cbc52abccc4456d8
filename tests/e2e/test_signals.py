"""Signals, the run folder's lease and storage URIs, on one real run (the smoke config, shrunk) whose run
folder is on a real S3-compatible server (moto on loopback: the `s3` fixture, tests/s3server.py), named
as a user of MinIO would: `s3://bucket/...?endpoint_override=host:port&scheme=http`. One folder throughout:

    1. `kesi run` starts; once the baseline has trained an epoch, a second driver on the same folder is
       refused in one line naming the first (host, pid); `kesi status` reads the run in progress from S3;
       the first driver gets SIGINT (Ctrl-C, sent to its process group as a terminal does): exit 130, the
       baseline recorded as interrupted, one line with the exact `--resume` command, no other tool's
       resume advice, no process of it left;
    2. a stale lease of a driver on a lost node is planted; `--resume` takes it over with a warning, goes
       on with the baseline after its last epoch checkpoint on S3, and once a branch of prune_1 has
       trained an epoch the driver alone gets SIGTERM (what `kill`, `ray job stop` or a preempted node
       sends): exit 143, prune_1 interrupted, its Ray gone with it;
    3. `--resume` runs to completion; `kesi status` shows every stage complete with no stale error, and
       every artefact of the run is an object on the server (manifest, config, data, snapshots, soft
       labels, Ray Train/Tune state, TensorBoard logs, report, model card), each snapshot registered
       once, no temp object and no half-published checkpoint folder left.

A driver killed outright (SIGKILL) and resumed is tests/e2e/test_resume.py (at four points, bit for bit);
the storage primitives (reads, writes, listings, copies, atomic writes, checkpoints, manifest) run on
the same server in tests/core/test_storage.py, whose `root` fixture includes s3://.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kesi_dist.data.loaders  # noqa: F401 - imported here, so that the in-process second driver answers at once
import kesi_dist.launch  # noqa: F401
import kesi_dist.methods.kesi.report  # noqa: F401
from kesi_dist import storage
from kesi_dist.cli import main
from kesi_dist.status import format_status, run_status
from tests.killing import _gone, _manifest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")
SETS = ("baseline.epochs=4", "prune.iterations=1", "tune.branches=1", "retrain.epochs=3", "fixed_lr.enabled=false",
        "distill.epochs=1", "distill.mode=cached")
EXPECTED = {"baseline", "iter1_b0", "student"}

pytestmark = pytest.mark.slow


def _argv(run: str, resume: bool = False) -> list[str]:
    return ["run", SMOKE, "--output", run, *[a for s in SETS for a in ("--set", s)], *(["--resume"] if resume else [])]


def _start(run: str, log: Path, resume: bool, env: dict) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "kesi_dist.cli", *_argv(run, resume)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _until(proc: subprocess.Popen, run: str, log: Path, when, what: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = _manifest(run)
        if m is not None and when(m):
            return m
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{what} not reached in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _on_s3(run: str, *parts: str) -> bool:
    return storage.is_file(storage.join(run, *parts))


def _checkpoints(run: str, name: str) -> list[str]:
    """The epoch checkpoint folders of training run `name` that are whole (their marker is on S3)."""
    folder = storage.join(run, "train", name)
    if not storage.is_dir(folder):
        return []
    return [n for n in storage.listdir(folder) if n.startswith("checkpoint_")
            and storage.published(storage.join(folder, n))]


def _objects(s3, run: str) -> list[str]:
    """Every object key under the run, relative to it, read from the server itself."""
    import pyarrow.fs as pafs

    _, prefix = storage.storage_fs(run)
    infos = s3.filesystem().get_file_info(pafs.FileSelector(prefix, recursive=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def _second_driver_refused(run: str, first: subprocess.Popen, capsys) -> None:
    capsys.readouterr()
    assert main(_argv(run, resume=True)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --output ") and "Traceback" not in err, err
    assert f"another kesi driver is running this run (pid {first.pid} on {socket.gethostname()}, started " in lines[0]


def _stopped(proc: subprocess.Popen, log: Path, sig: str, stage: str, run: str) -> str:
    assert proc.wait(timeout=300) == {"SIGINT": 130, "SIGTERM": 143}[sig], log.read_text()[-3000:]
    text = log.read_text()
    resume = shlex.join(["kesi", *_argv(run, resume=True)])  # the URI's query string is quoted for the shell
    assert text.strip().splitlines()[-1] == f"interrupted by {sig} during stage {stage}; resume with: {resume}", text[-3000:]
    assert "Traceback" not in text and "Tuner.restore" not in text and "restore(" not in text, text[-3000:]
    m = _manifest(run)
    assert m["status"] == "interrupted" and m["stages"][stage]["status"] == "interrupted", m["stages"]
    assert m["stages"][stage]["interrupted"] == sig and not storage.exists(storage.join(run, "lease.json"))
    _gone(proc.pid, 120)  # nothing of the stopped run left: Ray's processes went down with it
    return text


@pytest.mark.timeout(3600)
def test_sigint_and_sigterm_on_s3_then_resume_and_a_second_driver_refused(s3, tmp_path, capsys):
    run = s3.uri("run")
    env = {**os.environ, "KESI_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    # 1. SIGINT to the process group during the baseline's training, once its first epoch checkpoint is
    # whole on S3 and its progress file (what `kesi status` reads, written after the report) is there too
    log1 = tmp_path / "1.log"
    first = _start(run, log1, resume=False, env=env)
    _until(first, run, log1, lambda m: m["stages"].get("baseline", {}).get("status") == "running", "the baseline")
    _second_driver_refused(run, first, capsys)
    _until(first, run, log1, lambda m: m["stages"]["baseline"]["status"] == "running"
           and bool(_checkpoints(run, "baseline")) and _on_s3(run, "progress", "baseline.json"),
           "the baseline's first epoch checkpoint")
    live = run_status(run)  # `kesi status` reads the run in progress from S3
    assert live["status"] == "running" and live["run"] == run
    assert {s["stage"]: s["status"] for s in live["stages"]} == {"data": "complete", "baseline": "running"}
    assert [(t["name"], t["epochs"]) for t in live["training"]] == [("baseline", 4)]
    assert "·  running (started" in format_status(live)
    os.killpg(first.pid, signal.SIGINT)
    _stopped(first, log1, "SIGINT", "baseline", run)
    last_done = max(int(n.split("_")[1]) for n in _checkpoints(run, "baseline")) + 1

    # 2. a stale lease (a driver on a node that was lost an hour ago) taken over; the baseline goes on after
    # its last checkpoint on S3; SIGTERM to the driver process alone while a branch of prune_1 trains
    storage.write_text(storage.join(run, "lease.json"), json.dumps({
        "host": "node-gone", "pid": 4242, "started": time.time() - 7200, "heartbeat": time.time() - 3600,
        "token": "theirs"}))
    log2 = tmp_path / "2.log"
    second = _start(run, log2, resume=True, env=env)
    _until(second, run, log2, lambda m: m["stages"].get("prune_1", {}).get("status") == "running", "prune_1")
    _second_driver_refused(run, second, capsys)
    _until(second, run, log2, lambda m: m["stages"]["prune_1"]["status"] == "running"
           and _on_s3(run, "progress", "iter1_b0.json"), "a prune_1 branch's first epoch")
    os.kill(second.pid, signal.SIGTERM)
    text = _stopped(second, log2, "SIGTERM", "prune_1", run)
    assert "warning: " in text and "taking over the lease of the driver pid 4242 on node-gone" in text
    assert "no heartbeat for 36" in text  # 3600 s and a few
    assert f"baseline: resuming at epoch {last_done + 1} from its epoch-{last_done} checkpoint" in text, text[-3000:]
    m = _manifest(run)
    assert m["stages"]["baseline"]["status"] == "complete" and m["stages"]["baseline"]["attempts"] == 2
    assert m["snapshots"]["baseline"]["resumed_at"] == [last_done]

    # 3. to completion
    done = subprocess.run([sys.executable, "-m", "kesi_dist.cli", *_argv(run, resume=True)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    m = _manifest(run)
    assert m["status"] == "complete" and m["stages"]["prune_1"]["attempts"] == 2
    assert set(m["snapshots"]) == EXPECTED and m["stages"]["data"]["attempts"] == 1
    assert m["stages"]["data"]["path"] == storage.join(run, "data")
    events = [e["event"] for e in m["events"]]
    assert events.count("run interrupted") == 2 and "interrupted baseline" in events and "interrupted prune_1" in events
    assert events.count("resume") == 2 and events[-1] == "run complete"
    for name in EXPECTED:
        assert events.count(f"snapshot {name}") == 1, name  # registered once
    status = run_status(run)
    assert all(r["status"] == "complete" and "detail" not in r for r in status["stages"]), status["stages"]
    assert status["status"] == "complete" and status["driver"] is None and not status["training"]
    assert not storage.exists(storage.join(run, "lease.json"))
    report = json.loads(storage.read_text(storage.join(run, "report.json")))
    assert report["student"]["val_acc"] is not None and report["ensemble"]["teachers"]
    assert {r["row"]: r["val_acc"] for r in status["report_rows"]}["student"] == report["student"]["val_acc"]
    assert f"{run}  ·  kesi  ·  resnet20  ·  complete" in format_status(status)

    # Every artefact is an object on the server; no temp object and no half-published folder is left.
    keys = _objects(s3, run)
    assert {"manifest.json", "config.yaml", "report.json", "report.md", "accuracy_vs_macs.png", "MODEL_CARD.md",
            "data/train.beton", "data/val.beton", "data/meta.json", "soft_labels/meta.json"} <= set(keys)
    assert {s["checkpoint"] for s in m["snapshots"].values()} <= set(keys)
    for sub in ("baseline", "prune_1/iter1_b0", "distill", "report"):
        assert any(k.startswith(f"tensorboard/{sub}/events.out.tfevents") for k in keys), sub
    assert any(k.startswith("train/prune_1/tune/") for k in keys)  # Ray Tune's own state, through the URI
    folders = {k.rsplit("/", 1)[0] for k in keys if "/checkpoint_" in k}
    assert folders and all(f"{f}/{storage.PUBLISHED}" in keys for f in folders)
    assert not [k for k in keys if k.endswith(".tmp")]
    # No URI was mistaken for a local path; every process used one node-local copy of the data.
    assert not (ROOT / "s3:").exists()
    assert len([p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock")]) == 1
