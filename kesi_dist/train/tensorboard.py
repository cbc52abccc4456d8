"""A small TensorBoard writer for scalars and hyper-parameters (one writer per run, never per rank).

Scalars are namespaced by the caller's keys (`train/loss`, `val/acc`, `lr`, ...). `hparams` records a
Tune trial's hyper-parameters next to its final metrics so TensorBoard's HPARAMS tab can compare trials.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ScalarWriter"]


class ScalarWriter:
    """Writes numeric scalars to `logdir`; a disabled writer (e.g. on rank > 0) accepts and drops them."""

    def __init__(self, logdir: str | Path | None, *, enabled: bool = True):
        self.logdir = str(logdir) if logdir else None
        self._writer = None
        if enabled and self.logdir:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is heavy

            Path(self.logdir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=self.logdir, flush_secs=10)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """Write every finite numeric value of `values` at `step` (other entries are skipped)."""
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Record a trial's hyper-parameters with its final metrics (in the same run folder)."""
        if self._writer is None:
            return
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        final = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._writer.add_hparams(clean, final, run_name=".")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "ScalarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
