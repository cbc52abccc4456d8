"""The node-local cache: local copies of files and folders that live on a storage URI.

FFCV memory-maps `.beton` files, so data on s3:// or gs:// is fetched once per node and version into
`data_cache_dir()` (`$KESI_CACHE_DIR`, default `~/.cache/kesi_dist/data`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from kesi_dist.storage.fs import copy_stream, is_uri, storage_fs

__all__ = ["data_cache_dir", "local_copy"]


def data_cache_dir() -> str:
    """The node-local cache for `local_copy`: `$KESI_CACHE_DIR`, else `~/.cache/kesi_dist/data`."""
    return os.environ.get("KESI_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kesi_dist", "data")


def local_copy(path, cache_root: str | os.PathLike | None = None) -> str:
    """A local path holding the file or folder `path`: `path` itself when local, else a copy in the
    node-local cache `cache_root` (default `data_cache_dir()`).

    The copy is made once per node and version: its key hashes the URI with the size and
    modification time of every file, so a changed source gets a fresh copy (old ones stay until the
    cache folder is deleted). A lock file serialises actors of one node that ask at the same time;
    the copy is downloaded into a temp folder and renamed, so a crashed download is never used.

    Raises:
        FileNotFoundError: nothing exists at `path`.
    """
    if not is_uri(path):
        return str(path)
    import pyarrow.fs as pafs  # pyarrow: only where a URI is read

    fs, p = storage_fs(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if info.type == pafs.FileType.Directory:
        listing = [(i.path[len(p):].lstrip("/"), i.size, i.mtime_ns)
                   for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if i.type == pafs.FileType.File]
    else:
        listing = [("", info.size, info.mtime_ns)]
    key = hashlib.sha256(json.dumps([path.rstrip("/"), sorted(listing)]).encode()).hexdigest()[:20]
    root = Path(cache_root or data_cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    name = p.rstrip("/").rsplit("/", 1)[-1] or "root"
    final = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not final.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
            try:
                for rel, _, _ in listing:
                    dst = tmp / name / rel if rel else tmp / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with open(dst, "wb") as f:
                        copy_stream(fs, f"{p.rstrip('/')}/{rel}" if rel else p, f)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return str(final / name)
