"""The run directory: where a run's files live, and the rules for starting or resuming one.

    <run>/manifest.json        stage status + snapshot registry (kesi_dist.pipeline.manifest)
    <run>/config.yaml          the resolved config the run was started with
    <run>/data/                prepared .beton files + meta.json (unless data.prepared points elsewhere)
    <run>/snapshots/<name>.pt  every snapshot, kesi_dist checkpoint format
    <run>/train/               Ray Train / Tune working storage (epoch checkpoints, trial state)
    <run>/tensorboard/         one subfolder per stage / snapshot / trial
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kesi_dist.config import Config, config_to_yaml
from kesi_dist.errors import UsageError
from kesi_dist.pipeline.manifest import Manifest, atomic_write_text

__all__ = ["RunDir", "open_run", "config_fingerprint"]


def config_fingerprint(cfg: Config) -> str:
    """Identity of an experiment: the resolved config minus where its output goes."""
    data = cfg.model_dump(mode="json")
    data.pop("output", None)
    data.get("cluster", {}).pop("address", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def snapshot(self, name: str) -> Path:
        return self.root / "snapshots" / f"{name}.pt"


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def open_run(output: str, cfg: Config, resume: bool) -> tuple[RunDir, Manifest]:
    """Create a new run directory, or reopen one for `--resume`; refuse anything ambiguous.

    Raises:
        UsageError: the folder holds another run (without --resume), is a non-empty folder that is not
            a run, or (with --resume) holds no run or a run of a different config.
    """
    if "://" in output:
        raise UsageError(f"--output {output}: storage URIs are not supported by kesi run yet; "
                         "use a local or shared (NFS) path")
    run = RunDir(Path(output).absolute())
    fingerprint = config_fingerprint(cfg)
    if run.manifest.exists():
        manifest = Manifest.load(run.manifest)
        status = manifest.data.get("status")
        if not resume:
            raise UsageError(
                f"--output {output}: already holds a {status} run; pass --resume to continue it, "
                "or choose a new --output (nothing was changed)"
            )
        if manifest.data.get("config_fingerprint") != fingerprint:
            import yaml

            old = yaml.safe_load(run.config.read_text()) if run.config.exists() else {}
            changed = _changed_keys(old or {}, cfg.model_dump(mode="json"))
            changed = [k for k in changed if k not in ("output", "cluster.address")]
            raise UsageError(
                f"--resume {output}: the run was started with a different config "
                f"(changed: {', '.join(changed) or 'unknown'}); resume with the original config "
                "or start a new --output"
            )
        manifest.data["status"] = "running"
        manifest.log("resume")
        return run, manifest
    if resume:
        raise UsageError(f"--resume {output}: no run to resume there (no manifest.json); drop --resume to start one")
    if run.root.exists() and any(run.root.iterdir()):
        raise UsageError(f"--output {output}: folder exists and is not a kesi_dist run; choose a new or empty folder")
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.config, config_to_yaml(cfg))
    return run, Manifest.create(run.manifest, fingerprint)
