"""Nothing a user downloads or writes can run code; no secret leaks into logs or run files.

- Every torch file is read by `kesi_dist.checkpoint.load_tensors` (`weights_only=True`); a grep over
  kesi_dist/ allows no other unpickling, `yaml.load`, `eval` or `exec`.
- A crafted pickle that would write a marker file is refused, and the marker never appears, on every
  path a user can point at one: `kesi run` with `baseline.checkpoint`, teacher loading, and (in
  tests/test_checkpoint.py) `load_checkpoint` itself; CIFAR pickles with code are refused in
  tests/test_bad_input.py (cifar_pickle_with_code).
- The local cluster script binds the dashboard to 127.0.0.1, keeps token auth and never prints the
  token: tests/runtime/test_local_cluster.py (test_up_prints_exports_and_is_idempotent, test_auth_is_enforced,
  test_connect_ray_rejected_token_fails_fast), not repeated here.
- A run under token auth (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) writes the token nowhere (console or run folder).
"""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest
import torch

from kesi_dist.checkpoint import FORMAT
from kesi_dist.cli import main
from kesi_dist.errors import RunError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "kesi" / "smoke.yaml")

# pattern -> the files (relative to kesi_dist/) allowed to contain it, and why
ALLOWED = {
    r"\btorch\.load\(": {"checkpoint.py"},  # load_tensors, weights_only=True
    r"\bpickle\.loads?\(|\bUnpickler\b": {"data/sources.py"},  # CIFAR: _NumpyOnlyUnpickler admits numpy only
    r"\byaml\.(load|unsafe_load|full_load)\(": set(),  # safe_load only
    r"(?<![\w.])eval\(": set(),  # model.eval() is fine, eval() of text is not
    r"(?<![\w.])exec\(": set(),
    r"weights_only\s*=\s*False|allow_pickle\s*=\s*True": set(),
}


def test_no_unsafe_loading_outside_the_known_places():
    pkg = ROOT / "kesi_dist"
    found: dict[str, set[str]] = {p: set() for p in ALLOWED}
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        for pattern in ALLOWED:
            if re.search(pattern, text):
                found[pattern].add(str(path.relative_to(pkg)))
    assert found == ALLOWED
    # and the one call (the other mentions are its docs) is the weights_only one
    mentions = re.findall(r"torch\.load\([^)]*\)", (pkg / "checkpoint.py").read_text())
    assert all("weights_only=True" in m for m in mentions)
    assert [m for m in mentions if "map_location" in m] == ['torch.load(source, map_location="cpu", weights_only=True)']


class _Evil:
    """Pickles into a call of `open(marker, "w")`: unpickling it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def crafted(tmp_path):
    """A file in the checkpoint format whose unpickling would create `pwned`."""
    marker = tmp_path / "pwned"
    path = tmp_path / "downloaded.pt"
    torch.save({"format": FORMAT, "arch": "resnet20", "num_classes": 10, "widths": [], "state_dict": {},
                "masks": None, "metrics": {}, "evil": _Evil(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_kesi_run_refuses_a_crafted_baseline_checkpoint(crafted, tmp_path, capsys):
    path, marker = crafted
    out = tmp_path / "run"
    code = main(["run", SMOKE, "--output", str(out), "--set", f"baseline.checkpoint={path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [f"error: baseline.checkpoint: {path}: refused to load: it holds more than tensors and plain "
                   "containers (unsupported global: GLOBAL io.open); only load checkpoints written by kesi_dist"]
    assert not marker.exists() and not out.exists()  # refused before Ray or the run folder


def test_teacher_loading_refuses_a_crafted_checkpoint(crafted):
    from kesi_dist.distill import load_teachers

    path, marker = crafted
    with pytest.raises(RunError, match="refused to load"):
        load_teachers([str(path)])
    assert not marker.exists()


def test_training_state_and_optimizer_files_refuse_code(tmp_path):
    """Resume files (train_state.pt, optimizer.pt) go through the same safe loader."""
    from kesi_dist.checkpoint import load_tensors

    marker = tmp_path / "pwned"
    path = tmp_path / "train_state.pt"
    torch.save({"epoch": 3, "scheduler": _Evil(marker)}, path)
    with pytest.raises(RunError, match="train_state.pt: refused to load"):
        load_tensors(path)
    assert not marker.exists()
    torch.save({"epoch": 3}, path)
    assert load_tensors(path) == {"epoch": 3}


@pytest.mark.slow  # reads the session's smoke run (run with RAY_AUTH_TOKEN set); costs nothing extra
def test_auth_token_is_never_written_or_printed(smoke_run):
    from tests.conftest import SMOKE_AUTH_TOKEN

    run, proc, _ = smoke_run
    assert SMOKE_AUTH_TOKEN not in proc.stdout + proc.stderr
    leaks = [p for p in run.rglob("*") if p.is_file() and SMOKE_AUTH_TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks
