"""Which device a worker computes on, and a loud stop when it asked for a GPU that is not there.

A Ray node can advertise GPUs that this process cannot use (no driver, a driver older than torch's
CUDA, CUDA_VISIBLE_DEVICES emptied); training on the CPU then would hold the GPU and run many times
slower without a word. `compute_device(gpus)` returns the CUDA device when one was asked for and is
usable, raises `RunError` naming the host and what it saw when it is not, and returns the CPU when no
GPU was asked for.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from kesi_dist.errors import RunError

__all__ = ["compute_device", "cuda_report", "cuda_problem"]


def _driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "none (no /proc/driver/nvidia/version)"
    for word in text.split():  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ..."
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return text.splitlines()[0][:80] if text else "unknown"


def cuda_report() -> dict:
    """What this process sees of CUDA (plain data, for error messages and run records)."""
    return {"host": socket.gethostname(), "cuda_available": torch.cuda.is_available(),
            "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda or "none (CPU build)",
            "driver": _driver_version(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")}


def cuda_problem(gpus: float) -> str | None:
    """None when `gpus` (> 0) can be served by a usable CUDA device here, else one line saying why not."""
    if torch.cuda.is_available():
        return None
    r = cuda_report()
    return (f"node {r['host']}: asked for {gpus:g} GPU(s) per worker but no usable CUDA device is visible "
            f"(torch {r['torch']} built for CUDA {r['torch_cuda']}, NVIDIA driver {r['driver']}, "
            f"CUDA_VISIBLE_DEVICES={r['CUDA_VISIBLE_DEVICES']}); fix the node's driver or Ray's --num-gpus, "
            "or train on CPUs with train.gpus_per_worker: 0")


def compute_device(gpus: float) -> torch.device:
    """CUDA device 0 of this process when `gpus` > 0 (RunError if there is none), else the CPU."""
    if gpus <= 0:
        return torch.device("cpu")
    problem = cuda_problem(gpus)
    if problem:
        raise RunError(problem)
    return torch.device("cuda", 0)
