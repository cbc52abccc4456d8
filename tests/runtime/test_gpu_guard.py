"""A GPU request never trains on the CPU in silence: on a Ray that advertises a GPU this machine cannot
use (`num_gpus=1` on a CPU-only machine), `kesi run` stops before its run folder exists, with one
line naming the node and what it saw; a training run placed on such a GPU stops in its worker the same
way. Each case is its own process, with its own local Ray started with the fake GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kesi_dist.errors import RunError
from kesi_dist.train.devices import compute_device

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")
FAKE_GPU_RAY = "import ray; ray.init(address='local', num_cpus=2, num_gpus=1, include_dashboard=False, " \
               "log_to_driver=False)\n"


def _python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FAKE_GPU_RAY + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_compute_device():
    assert compute_device(0) == torch.device("cpu")
    if torch.cuda.is_available():
        assert compute_device(0.5).type == "cuda"
    else:
        with pytest.raises(RunError, match=r"asked for 0.5 GPU\(s\) per worker but no usable CUDA device.*"
                                           r"CUDA_VISIBLE_DEVICES="):
            compute_device(0.5)


@pytest.mark.slow  # a real `kesi run` process
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_kesi_run_with_a_gpu_that_cuda_cannot_use_stops_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    proc = _python(f"""
        import sys
        from kesi_dist.cli import main
        sys.exit(main(["run", {SMOKE!r}, "--output", {str(out)!r}, "--set", "train.gpus_per_worker=1"]))
    """)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "asked for 1 GPU(s) per worker but no usable CUDA device" in errors[0]
    assert "NVIDIA driver" in errors[0] and "CUDA_VISIBLE_DEVICES=" in errors[0] and "node " in errors[0]
    assert not out.exists()  # refused before the run folder: nothing prepared, nothing trained


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_training_run_placed_on_an_unusable_gpu_stops_in_its_worker(tmp_path, tiny_data):
    """The backstop inside the worker (a GPU that breaks after the preflight, or a direct caller)."""
    proc = _python(f"""
        from kesi_dist.errors import RunError
        from kesi_dist.runtime import run_training
        from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec
        try:
            run_training(model=ModelSpec("resnet20", num_classes=4), schedule=ScheduleSpec(epochs=1),
                         loader=LoaderSpec({tiny_data!r}, batch_size=64, resolution=16, backend="torch", num_workers=0),
                         engine=EngineSpec(num_workers=0, gpus_per_worker=1, max_failures=0),
                         storage_path={str(tmp_path / "s")!r}, name="gpu", progress=False)
        except RunError as e:
            print("RUNERROR", e)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RUNERROR"))
    assert "training run 'gpu' failed: node " in line and "no usable CUDA device" in line
    assert not list((tmp_path / "s").glob("gpu/checkpoint_*"))  # not a single epoch ran on the CPU
