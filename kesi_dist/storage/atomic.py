"""Atomic file writes: a temp file in the same folder, fsync, then rename; a reader never sees half a file.

The one place kesi_dist writes a local file that must appear whole: checkpoints, the manifest, soft-label
shards, `.beton` files (`atomic_path`, for writers that want a file name) and checkpoint folders
(`atomic_dir`). `kesi_dist.storage` routes local paths here and does the same on storage URIs.

A failed write (disk full, permission, a crash of the writer) leaves the previous file, if any,
untouched and no temp file behind; an OS error surfaces as a one-line `RunError` naming the file.
A writer killed outright (SIGKILL) cannot clean up: its temp file is removed by the next write of
the same file on the same host.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import IO, Callable, Iterator

from kesi_dist.errors import RunError

__all__ = ["atomic_write", "atomic_write_text", "atomic_path", "atomic_dir"]


_HOST = socket.gethostname().replace(".", "-") or "host"


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files (or folders) of `path` left by a writer on this host that was killed (SIGKILL,
    power loss) mid-write; a temp of a live process, or of another host of a shared folder, is left alone."""
    prefix = f".{path.name}.{_HOST}."
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_error(path: Path, e: OSError) -> RunError:
    reason = (e.strerror or str(e)).lower() if e.strerror or str(e) else type(e).__name__
    # An OS error about another file (a source the writer reads, a folder that vanished under it) names
    # that file: "cannot write X: no such file or directory" alone would send the user to the wrong place.
    other = e.filename if e.filename and Path(str(e.filename)).name not in (path.name,) \
        and not Path(str(e.filename)).name.startswith(f".{path.name}.") else None
    if other:
        return RunError(f"{path}: cannot write it: {reason}: {other}; nothing was replaced")
    return RunError(f"{path}: cannot write it: {reason}; nothing was replaced (free space or fix the "
                    "permissions, then re-run)")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path` for a writer that wants a file name (FFCV's DatasetWriter);
    on a clean exit it is fsynced and renamed to `path`, on an error it is removed.

    Raises:
        RunError: an OS error while writing or renaming (ENOSPC, EACCES, ...), naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        # Not mkstemp: its files are 0600, and a run folder is read by other users' nodes; this honours the umask.
        tmp = _temp_name(path)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder next to `path`; on a clean exit it replaces folder `path` as a whole
    (an old folder of that name is removed first), on an error it is removed. A reader sees the old
    folder, no folder, or the whole new one, never a half-filled one.

    Raises:
        RunError: an OS error while filling or renaming it, naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        tmp = _temp_name(path)
        tmp.mkdir()
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Tracked:
    """A file proxy that remembers the first OS error of a write (writers may re-raise it as another type)."""

    def __init__(self, f: IO):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Call `write(f)` on a temp file next to `path`, then atomically rename it to `path`.

    Raises:
        RunError: an OS error while writing or renaming (ENOSPC, EACCES, ...), naming `path`.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            tracked = _Tracked(f)
            try:
                write(tracked)
            except Exception:
                if tracked.error is not None:  # torch.save turns ENOSPC into an opaque RuntimeError
                    raise tracked.error from None
                raise
            f.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")
