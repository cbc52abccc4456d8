"""BatchNorm modes a search needs: batch statistics with the running ones frozen, and recalibration.

A sub-network cut out of a trained net (EKG's masked candidates, SWP's sliced supernets) sees other
activation statistics than the running ones its BatchNorm layers hold: evaluating it in eval mode
would normalise with the wrong mean and variance. `batch_statistics` normalises every batch with its
own statistics (as the EKG reference does throughout its search) and leaves the running statistics
untouched, so the weights and buffers of the searched network never change.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

__all__ = ["batch_norms", "batch_statistics"]


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm (each batch's own statistics) whose running statistics neither are read nor
    move; the model's mode and flags are restored afterwards."""
    norms = batch_norms(model)
    tracked = [m.track_running_stats for m in norms]
    was = model.training
    model.train()
    for m in norms:
        m.track_running_stats = False  # in train mode: batch statistics, running ones neither read nor updated
    try:
        yield
    finally:
        for m, t in zip(norms, tracked):
            m.track_running_stats = t
        model.train(was)
