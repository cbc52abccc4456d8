"""The run directory: where a run's files live, and the rules for starting or resuming one.

    <run>/manifest.json        stage status + snapshot registry (kesi_dist.runs.manifest)
    <run>/lease.json           the driver writing the run, while it runs (kesi_dist.runs.lease)
    <run>/config.yaml          the resolved config the run was started with
    <run>/data/                prepared .beton files + meta.json (unless data.prepared points elsewhere)
    <run>/snapshots/<name>.pt  every snapshot, kesi_dist checkpoint format
    <run>/train/               Ray Train / Tune working storage (epoch checkpoints, trial state)
    <run>/tensorboard/         one subfolder per stage / snapshot / trial
    <run>/soft_labels/         cached distillation: the teachers' top-k soft labels
    <run>/report.{json,md}, accuracy_vs_macs.png

The root is an absolute local (or shared NFS) path, or a storage URI (s3://, gs://, file://, ...; see
`kesi_dist.storage`). Every location is a string (`RunDir.path`), readable from any node that can
reach the root; the same refusal rules hold for both.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import yaml

from kesi_dist import storage
from kesi_dist.errors import RunError, UsageError
from kesi_dist.runs.lease import LEASE
from kesi_dist.runs.manifest import Manifest

__all__ = ["RunDir", "open_run", "check_run", "config_fingerprint", "PLACEMENT_KEYS"]

# Where a run goes and which cluster runs it: not part of what the experiment is.
PLACEMENT_KEYS = ("output", "cluster.address")


def _without(config: dict, keys: tuple[str, ...]) -> dict:
    data = json.loads(json.dumps(config))  # a deep copy of plain data
    for key in keys:
        *path, leaf = key.split(".")
        node = data
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def config_fingerprint(config: dict, ignore: tuple[str, ...] = PLACEMENT_KEYS) -> str:
    """Identity of an experiment: the resolved config (plain data) minus where it runs."""
    return hashlib.sha256(json.dumps(_without(config, ignore), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunDir:
    root: str  # absolute local path or storage URI

    def path(self, *parts: str) -> str:
        """`<root>/<parts...>` (a URI when the root is one)."""
        return storage.join(self.root, *parts)

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def config(self) -> str:
        return self.path("config.yaml")

    @property
    def data(self) -> str:
        return self.path("data")

    @property
    def train(self) -> str:
        return self.path("train")

    @property
    def tensorboard(self) -> str:
        return self.path("tensorboard")

    def snapshot(self, name: str) -> str:
        return self.path("snapshots", f"{name}.pt")

    @staticmethod
    def snapshot_rel(name: str) -> str:
        """A snapshot's path relative to the root (what the manifest records)."""
        return f"snapshots/{name}.pt"


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def check_run(output: str, config: dict, resume: bool) -> tuple[RunDir, Manifest | None]:
    """Every refusal of `open_run`, writing nothing: (the run folder, its manifest when it holds a run).

    `kesi run` calls it before Ray starts, so a refused run costs no Ray start-up. A lease file alone
    (`kesi_dist.runs.lease`, written by the driver that is about to start the run) is not content.

    Raises:
        UsageError: the folder holds another run (without --resume), is a non-empty folder that is not
            a run, or (with --resume) holds no run or a run of a different config.
        RunError: the storage cannot be read, or the manifest is corrupt.
    """
    run = RunDir(storage.join(output) if storage.is_uri(output) else os.path.abspath(output))  # no trailing '/'
    fingerprint = config_fingerprint(config)
    try:
        has_manifest = storage.exists(run.manifest)
    except OSError as e:  # unreachable bucket, missing credentials, permission denied
        raise RunError(f"--output {output}: cannot read the storage ({e}); check the URI and credentials") from None
    if has_manifest:
        manifest = Manifest.load(run.manifest)
        status = manifest.data.get("status")
        if not resume:
            raise UsageError(
                f"--output {output}: already holds a {status} run; pass --resume to continue it, "
                "or choose a new --output (nothing was changed)"
            )
        if manifest.data.get("config_fingerprint") != fingerprint:
            old = _saved_config(run)
            changed = _changed_keys(old, config)
            changed = [k for k in changed if k not in PLACEMENT_KEYS]
            raise UsageError(
                f"--resume {output}: the run was started with a different config "
                f"(changed: {', '.join(changed) or 'unknown'}); resume with the original config "
                "or start a new --output"
            )
        return run, manifest
    if resume:
        raise UsageError(f"--resume {output}: no run to resume there (no manifest.json); drop --resume to start one")
    if storage.exists(run.root) and (not storage.is_dir(run.root)
                                     or [n for n in storage.listdir(run.root) if n != LEASE]):
        raise UsageError(f"--output {output}: folder exists and is not a kesi_dist run; choose a new or empty folder")
    return run, None


def _saved_config(run: RunDir) -> dict:
    """config.yaml of a run as a mapping ({} when missing or unreadable: only used to name changes)."""
    try:
        old = yaml.safe_load(storage.read_text(run.config)) if storage.exists(run.config) else {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    return old if isinstance(old, dict) else {}


def open_run(output: str, config: dict, resume: bool) -> tuple[RunDir, Manifest]:
    """Create a new run directory, or reopen one for `--resume`; refuse anything ambiguous (`check_run`).

    `config` is the resolved config as plain data (saved as config.yaml; its fingerprint, without
    `PLACEMENT_KEYS`, must match for a resume).
    """
    run, manifest = check_run(output, config, resume)
    if manifest is not None:
        manifest.data["status"] = "running"
        manifest.log("resume")
        return run, manifest
    storage.makedirs(run.root)
    storage.write_text(run.config, yaml.safe_dump(config, sort_keys=False))
    return run, Manifest.create(run.manifest, config_fingerprint(config))
