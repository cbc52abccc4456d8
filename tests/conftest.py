"""Shared fixtures: a small prepared synthetic dataset and one local Ray instance per test session.

Ray is started once (`ray.init(address="local", num_cpus=2)`: never attaches to a cluster another
process started with `ray start`) and shut down at the end of the session; tests that need it ask
for the `ray_local` fixture.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared synthetic dataset (train.beton, val.beton, meta.json): 4 classes, 16 px, easy.

    Returns the folder (str). 512 train / 256 val images: large enough that a CIFAR ResNet-20 is well
    above chance (25 %) after a few epochs, small enough for an epoch in ~a second on 2 CPU cores.
    """
    from kesi_dist.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("tiny_data")
    prepare_dataset("synthetic", None, out, resolution=16, seed=0, workers=1,
                    num_train=1024, num_val=256, num_classes=4, difficulty=0.2)
    return str(out)


def _init_local_ray():
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray (2 CPUs, no dashboard, worker logs kept off the test output)."""
    yield _init_local_ray()
    import ray

    ray.shutdown()


SMOKE_AUTH_TOKEN = "kesitoken" + "5f0c9a7e3b1d4c2a8e6f0b9d7c5a3e1f2b4d6c8a0e9f7d5b3c1a"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One uninterrupted `kesi run configs/kesi/smoke.yaml` in a subprocess (its own local Ray).

    Returns (run folder, CompletedProcess, seconds). Session-scoped: tests/e2e/test_pipeline.py checks it,
    tests/e2e/test_resume.py compares a killed-and-resumed run with it.
    """
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = tmp_path_factory.mktemp("smoke") / "run"
    started = time.time()
    # Token authentication on, with this token (the local Ray adopts it and every process of the run must
    # present it): tests/e2e/test_security.py checks that it appears in no output and no file of the run.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": SMOKE_AUTH_TOKEN}
    proc = subprocess.run([sys.executable, "-m", "kesi_dist.cli", "run", str(root / "configs" / "kesi" / "smoke.yaml"),
                           "--output", str(run)], capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc, time.time() - started


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto) on loopback for the whole session (tests/s3server.py): dummy
    AWS_* credentials set, bucket created; `s3.uri(path)` is a fresh s3:// URI on it. Fails, never
    skips, when moto is not installed."""
    from tests.s3server import serve

    yield from serve()
