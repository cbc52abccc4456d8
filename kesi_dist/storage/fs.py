"""Which filesystem a path or URI is on: the primitives every storage helper (and the node-local data
cache, `kesi_dist.storage.cache`) builds on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from kesi_dist.errors import UsageError

__all__ = ["REGISTERED", "is_uri", "absolute", "register_filesystem", "storage_fs", "copy_stream"]

REGISTERED: dict[str, object] = {}  # scheme -> pyarrow filesystem (`register_filesystem`)


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` strings; plain paths (and every `Path`) are local."""
    return isinstance(path, str) and "://" in path


def register_filesystem(scheme: str, filesystem) -> None:
    """Serve `scheme://<path>` from a pyarrow filesystem object (e.g. an fsspec filesystem wrapped in
    `pyarrow.fs.PyFileSystem(FSSpecHandler(...))`). Registration is per process: Ray workers on
    other processes or nodes only see schemes pyarrow knows (s3, gs, hdfs, file)."""
    REGISTERED[scheme] = filesystem


def storage_fs(path: str | os.PathLike):
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/runs.

    Raises:
        UsageError: the URI's scheme is unknown or its filesystem cannot be set up (the message
            is pyarrow's, e.g. missing credentials or an unknown bucket region).
    """
    import pyarrow.fs as pafs

    if is_uri(path):
        scheme, rest = path.split("://", 1)
        if scheme in REGISTERED:
            return REGISTERED[scheme], rest.rstrip("/") or "/"
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError with its own text
            raise UsageError(f"storage {path!r}: not a usable filesystem URI ({e})") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def absolute(path: str | os.PathLike) -> str:
    """What a process on any node is given: a URI as is, a local path made absolute."""
    return path if is_uri(path) else str(Path(path).resolve())


def copy_stream(src_fs, src: str, dst: IO[bytes]) -> None:
    """Copy the file `src` of pyarrow filesystem `src_fs` into the open binary file `dst`."""
    with src_fs.open_input_stream(src) as fin:
        while chunk := fin.read(1 << 22):
            dst.write(chunk)
