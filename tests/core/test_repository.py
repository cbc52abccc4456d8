"""The repository ships what the package imports: no source file is hidden by .gitignore.

An unanchored `runs/` pattern once hid kesi_dist/runs/__init__.py: every test passed here and a clean
clone could not import kesi_dist.runs. Checked on the working tree, where such a file exists.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_no_source_or_config_file_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an unpacked release has nothing to hide)")
    where = ["kesi_dist", "tests", "configs", "bench", "cluster"]
    out = ""
    for which in (["--others"], ["--cached"]):  # untracked, and tracked but matching a pattern (a later add misses)
        out += subprocess.run(["git", "ls-files", *which, "--ignored", "--exclude-standard", *where], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    hidden = [p for p in out.splitlines() if p.endswith((".py", ".yaml", ".yml", ".sh", ".toml", ".md"))]
    assert not hidden, f"ignored by .gitignore, so missing from every clone: {hidden}"
