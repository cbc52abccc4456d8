"""The run manifest: stage status and the snapshot registry, one JSON file written atomically.

`<run>/manifest.json` is the single source of truth for `--resume`: a stage is complete only once its
outputs are on disk *and* the manifest says so (outputs are written first, the manifest last), and a
snapshot is registered once under a unique name, so a re-run can neither lose nor duplicate one.
The manifest may live on a storage URI (`kesi_dist.storage`); it is written atomically there too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kesi_dist import storage
from kesi_dist.errors import RunError

__all__ = ["Manifest", "now"]

FORMAT = "kesi_dist/manifest/v1"


def now() -> float:
    return round(time.time(), 3)


class Manifest:
    """Stage status + snapshot registry of one run directory.

    Stages: name -> {"status": "running"|"complete"|"failed"|"interrupted", "start", "end", ...info}.
    Snapshots: name -> registry entry (arch, widths, params, macs, val_acc, parent, iteration, branch,
    hparams, checkpoint, node_id, start, end, ...). Insertion order is kept.
    """

    def __init__(self, path: str | Path, data: dict[str, Any]):
        self.path = path if storage.is_uri(path) else Path(path)  # a URI stays a string
        self.data = data

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config_fingerprint: str) -> "Manifest":
        m = cls(path, {
            "format": FORMAT, "config_fingerprint": config_fingerprint, "status": "running",
            "created": now(), "stages": {}, "snapshots": {}, "events": [],
        })
        m.save()
        return m

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        try:
            data = json.loads(storage.read_text(path))
        except FileNotFoundError:
            raise RunError(f"{path}: no manifest; is this a kesi_dist run directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"{path}: corrupt manifest ({e}); restore it or start a new run") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RunError(f"{path}: not a kesi_dist manifest (format {data.get('format')!r})"
                           if isinstance(data, dict) else f"{path}: not a kesi_dist manifest")
        return cls(path, data)

    def save(self) -> None:
        storage.write_text(self.path, json.dumps(self.data, indent=1))

    # -- stages ---------------------------------------------------------------------------------
    @property
    def stages(self) -> dict[str, dict]:
        return self.data["stages"]

    @property
    def snapshots(self) -> dict[str, dict]:
        return self.data["snapshots"]

    def is_complete(self, stage: str) -> bool:
        return self.stages.get(stage, {}).get("status") == "complete"

    def start_stage(self, stage: str, **info: Any) -> None:
        entry = self.stages.get(stage, {})
        attempts = entry.get("attempts", 0) + 1
        # What ended the previous attempt (its error, the signal) is in the events; the entry is this one's.
        entry = {k: v for k, v in entry.items() if k not in ("error", "interrupted", "end")}
        self.stages[stage] = {**entry, "status": "running", "start": now(), "attempts": attempts, **info}
        self.log(f"start {stage}", attempt=attempts)

    def finish_stage(self, stage: str, **info: Any) -> None:
        entry = self.stages.setdefault(stage, {"start": now()})
        entry.update(status="complete", end=now(), **info)
        self.log(f"complete {stage}")

    def fail_stage(self, stage: str, error: str) -> None:
        entry = self.stages.setdefault(stage, {"start": now()})
        entry.update(status="failed", end=now(), error=error)
        self.log(f"failed {stage}", error=error)

    def interrupt_stage(self, stage: str, signame: str) -> None:
        """Stage `stage` was stopped by a signal: not failed, `--resume` redoes it."""
        entry = self.stages.setdefault(stage, {"start": now()})
        entry.update(status="interrupted", end=now(), interrupted=signame)
        self.log(f"interrupted {stage}", signal=signame)

    # -- snapshots ------------------------------------------------------------------------------
    def add_snapshot(self, name: str, entry: dict[str, Any]) -> None:
        """Register a snapshot; registering the same name again replaces it (never duplicates)."""
        self.snapshots[name] = {"name": name, **entry}
        self.log(f"snapshot {name}")

    def log(self, event: str, **info: Any) -> None:
        """Append an event and persist the manifest (every event is durable)."""
        self.data["events"].append({"t": now(), "event": event, **info})
        self.save()
