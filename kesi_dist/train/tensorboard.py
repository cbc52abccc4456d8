"""A small TensorBoard writer for scalars and hyper-parameters (one writer per run, never per rank).

Scalars are namespaced by the caller's keys (`train/loss`, `val/acc`, `lr`, ...). `hparams` records a
Tune trial's hyper-parameters next to its final metrics so TensorBoard's HPARAMS tab can compare trials.

`logdir` may be a storage URI (s3://, gs://, file://): events are then written to a local temp folder
and uploaded to the URI after every flush and on close. `tensorboard --logdir s3://...` reads S3/GCS
directly (with TensorBoard's cloud extras installed), or sync the folder down first.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from kesi_dist import storage

__all__ = ["ScalarWriter"]


class ScalarWriter:
    """Writes numeric scalars to `logdir`; a disabled writer (e.g. on rank > 0) accepts and drops them."""

    def __init__(self, logdir: str | Path | None, *, enabled: bool = True):
        self.logdir = str(logdir) if logdir else None
        self._writer = None
        self._local = None  # the local staging folder when logdir is a URI
        if enabled and self.logdir:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is heavy

            if storage.is_uri(self.logdir):
                self._local = tempfile.mkdtemp(prefix="kesi-tb-")
            else:
                Path(self.logdir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=self._local or self.logdir, flush_secs=10)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Mapping[str, Any], step: int, flush: bool = True) -> None:
        """Write every finite numeric value of `values` at `step` (other entries are skipped)."""
        if self._writer is None:
            return
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self._writer.add_scalar(key, value, global_step=step)
        if flush:
            self._flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._flush()

    def _flush(self) -> None:
        self._writer.flush()
        if self._local:
            storage.upload_dir(self._local, self.logdir)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Record a trial's hyper-parameters with its final metrics (in the same run folder)."""
        if self._writer is None:
            return
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        final = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._writer.add_hparams(clean, final, run_name=".")
        self._flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if self._local:
                try:
                    storage.upload_dir(self._local, self.logdir)
                finally:
                    shutil.rmtree(self._local, ignore_errors=True)

    def __enter__(self) -> "ScalarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
