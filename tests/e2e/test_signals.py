"""Signals and the run folder's lease on one real run (the smoke config, shrunk), one folder throughout:

    1. `kesi run` starts; once the baseline has trained an epoch, a second driver on the same folder is
       refused in one line naming the first (host, pid), and the first gets SIGINT (Ctrl-C, sent to its
       process group as a terminal does): exit 130, the baseline recorded as interrupted, one line with
       the exact `--resume` command, no other tool's resume advice, no process of it left;
    2. a stale lease of a driver on a lost node is planted; `--resume` takes it over with a warning, and
       once a branch of prune_1 has trained an epoch the driver alone gets SIGTERM (what `kill`, `ray job
       stop` or a preempted node sends): exit 143, prune_1 interrupted, its Ray gone with it;
    3. `--resume` runs to completion; `kesi status` shows every stage complete with no stale error.
"""

from __future__ import annotations

import json
import os
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
from kesi_dist.cli import main
from kesi_dist.status import run_status
from tests.killing import _gone, _manifest

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")
SETS = ("baseline.epochs=4", "prune.iterations=1", "tune.branches=1", "retrain.epochs=3", "fixed_lr.enabled=false",
        "distill.epochs=1", "distill.mode=online")

pytestmark = pytest.mark.slow


def _argv(run: Path, resume: bool = False) -> list[str]:
    return ["run", SMOKE, "--output", str(run), *[a for s in SETS for a in ("--set", s)], *(["--resume"] if resume else [])]


def _start(run: Path, log: Path, resume: bool) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "kesi_dist.cli", *_argv(run, resume)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _until(proc: subprocess.Popen, run: Path, log: Path, when, what: str, timeout: float = 900) -> dict:
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


def _second_driver_refused(run: Path, first: subprocess.Popen, capsys) -> None:
    capsys.readouterr()
    assert main(_argv(run, resume=True)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --output ") and "Traceback" not in err, err
    assert f"another kesi driver is running this run (pid {first.pid} on {socket.gethostname()}, started " in lines[0]


def _stopped(proc: subprocess.Popen, log: Path, sig: str, stage: str, run: Path) -> str:
    assert proc.wait(timeout=300) == {"SIGINT": 130, "SIGTERM": 143}[sig], log.read_text()[-3000:]
    text = log.read_text()
    resume = "kesi " + " ".join(_argv(run, resume=True))  # no word here needs shell quoting
    assert text.strip().splitlines()[-1] == f"interrupted by {sig} during stage {stage}; resume with: {resume}", text[-3000:]
    assert "Traceback" not in text and "Tuner.restore" not in text and "restore(" not in text, text[-3000:]
    m = _manifest(run)
    assert m["status"] == "interrupted" and m["stages"][stage]["status"] == "interrupted", m["stages"]
    assert m["stages"][stage]["interrupted"] == sig and not (run / "lease.json").exists()
    _gone(proc.pid, 120)  # nothing of the stopped run left: Ray's processes went down with it
    return text


@pytest.mark.timeout(3600)
def test_sigint_and_sigterm_during_training_then_resume_and_a_second_driver_refused(tmp_path, capsys):
    run = tmp_path / "run"

    # 1. SIGINT to the process group during the baseline's training, after its first epoch
    log1 = tmp_path / "1.log"
    first = _start(run, log1, resume=False)
    _until(first, run, log1, lambda m: m["stages"].get("baseline", {}).get("status") == "running", "the baseline")
    _second_driver_refused(run, first, capsys)
    _until(first, run, log1, lambda m: m["stages"]["baseline"]["status"] == "running"
           and (run / "progress" / "baseline.json").exists(), "the baseline's first epoch")
    os.killpg(first.pid, signal.SIGINT)
    _stopped(first, log1, "SIGINT", "baseline", run)

    # 2. a stale lease (a driver on a node that was lost an hour ago) taken over; SIGTERM to the driver
    # process alone while a branch of prune_1 trains
    (run / "lease.json").write_text(json.dumps({"host": "node-gone", "pid": 4242, "started": time.time() - 7200,
                                                "heartbeat": time.time() - 3600, "token": "theirs"}))
    log2 = tmp_path / "2.log"
    second = _start(run, log2, resume=True)
    _until(second, run, log2, lambda m: m["stages"].get("prune_1", {}).get("status") == "running", "prune_1")
    _second_driver_refused(run, second, capsys)
    _until(second, run, log2, lambda m: m["stages"]["prune_1"]["status"] == "running"
           and (run / "progress" / "iter1_b0.json").exists(), "a prune_1 branch's first epoch")
    os.kill(second.pid, signal.SIGTERM)
    text = _stopped(second, log2, "SIGTERM", "prune_1", run)
    assert "warning: " in text and "taking over the lease of the driver pid 4242 on node-gone" in text
    assert "no heartbeat for 36" in text  # 3600 s and a few
    m = _manifest(run)
    assert m["stages"]["baseline"]["status"] == "complete" and m["stages"]["baseline"]["attempts"] == 2

    # 3. to completion
    done = subprocess.run([sys.executable, "-m", "kesi_dist.cli", *_argv(run, resume=True)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    m = _manifest(run)
    assert m["status"] == "complete" and m["stages"]["prune_1"]["attempts"] == 2
    events = [e["event"] for e in m["events"]]
    assert events.count("run interrupted") == 2 and "interrupted baseline" in events and "interrupted prune_1" in events
    status = run_status(str(run))
    assert all(r["status"] == "complete" and "detail" not in r for r in status["stages"]), status["stages"]
    assert status["status"] == "complete" and status["driver"] is None and not (run / "lease.json").exists()
