"""Where a run's files live: a local (or shared NFS) path, or a pyarrow filesystem URI.

Every helper takes either a plain path or a URI (`s3://bucket/runs/x`, `gs://...`, `file:///abs/path`,
`hdfs://...`, or a scheme added with `register_filesystem`) and does the same thing on both, so callers
never branch on where a run lives. Paths are handled as strings: `pathlib` would fold the `//` of a URI.

Atomic writes (`write_bytes`, `write_text`, `write_file`, `upload_file`, `copy_file`): a reader sees the
old file or the whole new one, never half of it.
- local paths: `kesi_dist.storage.atomic` (temp file in the same folder, fsync, `os.replace`);
- object stores (s3, gcs): the content is made whole locally first (a file being copied up from the
  local disk already is), then written to the final key: a single PUT, or a multipart upload when it
  completes, makes the object appear whole or not at all (a server-side move would be a full copy);
  a query string (`s3://b/x?endpoint_override=host:port&scheme=http`) stays at the end of every join;
- other filesystems (file://, hdfs, registered ones): a temp name in the same folder, then `fs.move`.

Credentials come from the environment as pyarrow reads them (AWS_* variables, ~/.aws, instance roles
for S3; GOOGLE_APPLICATION_CREDENTIALS or the metadata server for GCS).

Files that must be local to be used (FFCV memory-maps `.beton` files) are fetched once per node by
`local_copy` into a node-local cache (`data_cache_dir()`: `$KESI_CACHE_DIR`, default
`~/.cache/kesi_dist/data`), keyed by URI, sizes and modification times.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from kesi_dist.storage.atomic import atomic_dir, atomic_write
from kesi_dist.storage.cache import data_cache_dir, local_copy
from kesi_dist.storage.fs import REGISTERED as _REGISTERED  # noqa: F401 (tests unregister their schemes)
from kesi_dist.storage.fs import absolute, copy_stream, is_uri, register_filesystem, storage_fs

__all__ = [
    "is_uri", "absolute", "storage_fs", "register_filesystem", "join", "basename", "exists", "is_file", "is_dir", "size", "listdir",
    "makedirs", "remove", "remove_dir", "read_bytes", "read_text", "write_bytes", "write_text", "write_file",
    "copy_file", "upload_file", "upload_dir", "publish_dir", "published", "staged_dir", "local_copy", "data_cache_dir",
]

_NATIVE_ATOMIC = ("s3", "gcs")  # pyarrow type_name of filesystems whose object writes are atomic
PUBLISHED = ".kesi_published"  # the last object `publish_dir` writes into a folder on an object store


def _split_query(uri: str) -> tuple[str, str]:
    """(`uri` without its query string, the query with its '?' or ''): options such as
    `s3://bucket/x?endpoint_override=host:port&scheme=http` name the filesystem, not the path."""
    base, mark, query = uri.partition("?")
    return base, mark + query


def join(root: str | os.PathLike, *parts: str) -> str:
    """`root/part/...` as a string; URIs keep their scheme and their query string (at the end)."""
    if is_uri(root):
        base, query = _split_query(root)
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)]) + query
    return os.path.join(str(root), *parts)


def basename(path: str | os.PathLike) -> str:
    """The last part of a path or URI (without a URI's query string)."""
    path = _split_query(path)[0] if is_uri(path) else str(path)
    return path.rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else os.path.basename(path)


def _info(path):
    fs, p = storage_fs(path)
    return fs.get_file_info(p)


def exists(path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type != pafs.FileType.NotFound


def is_file(path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.File


def is_dir(path) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.Directory


def size(path) -> int:
    """Size in bytes of a file; FileNotFoundError if there is none."""
    import pyarrow.fs as pafs

    info = _info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such file")
    return int(info.size)


def listdir(path) -> list[str]:
    """Names of the entries directly in folder `path` (sorted; [] when it does not exist)."""
    import pyarrow.fs as pafs

    fs, p = storage_fs(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True)))


def makedirs(path) -> None:
    fs, p = storage_fs(path)
    fs.create_dir(p, recursive=True)


def remove(path) -> None:
    """Delete a file if it exists."""
    import pyarrow.fs as pafs

    fs, p = storage_fs(path)
    if fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def remove_dir(path) -> None:
    """Delete a folder and everything in it, if it exists."""
    import pyarrow.fs as pafs

    fs, p = storage_fs(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def read_bytes(path) -> bytes:
    """The whole content of a file; FileNotFoundError (naming `path`) when there is none."""
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, p = storage_fs(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except OSError:
        if not is_file(path):
            raise FileNotFoundError(f"{path}: no such file") from None
        raise


def read_text(path) -> str:
    return read_bytes(path).decode()


def _tmp_name(p: str) -> str:
    parent, name = p.rsplit("/", 1) if "/" in p else ("", p)
    return f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"


@contextmanager
def _output(path, whole: bool = False) -> Iterator[IO[bytes]]:
    """A writable binary stream whose content appears at `path` atomically when the block succeeds.
    `whole`: the caller writes content that is complete already (bytes in memory, a local file)."""
    fs, p = storage_fs(path)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    if fs.type_name in _NATIVE_ATOMIC and whole:
        with fs.open_output_stream(p) as f:
            yield f
        return
    if fs.type_name in _NATIVE_ATOMIC:
        # Nothing reaches the store before the content is whole: pyarrow completes an upload when its
        # stream closes, also when the block raised, so a failing writer would publish a part.
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
            yield spool
            spool.seek(0)
            with fs.open_output_stream(p) as f:
                shutil.copyfileobj(spool, f, 1 << 22)
        return
    tmp = _tmp_name(p)
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
        fs.move(tmp, p)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_file(path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a binary stream whose content replaces `path` atomically (see module doc)."""
    if not is_uri(path):
        atomic_write(path, write)
        return
    buf = io.BytesIO()  # writers such as torch.save and np.save may seek; remote streams cannot
    write(buf)
    write_bytes(path, buf.getvalue())


def write_bytes(path, data: bytes) -> None:
    """Replace `path` with `data` atomically (see the module docstring)."""
    if not is_uri(path):
        atomic_write(path, lambda f: f.write(data))
        return
    with _output(path, whole=True) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def copy_file(src, dst, *, src_fs=None) -> None:
    """Copy one file between any two locations (local or URI), atomically at `dst`.

    `src_fs`: a pyarrow filesystem that `src` is a path in (e.g. a Ray checkpoint's `filesystem`).
    """
    src_fs, s = (src_fs, src) if src_fs is not None else storage_fs(src)
    if not is_uri(dst):
        atomic_write(dst, lambda f: copy_stream(src_fs, s, f))
        return
    with _output(dst, whole=src_fs.type_name == "local") as f:  # a local file is whole: no spool (.beton files)
        copy_stream(src_fs, s, f)


def upload_file(local_path: str | os.PathLike, dst) -> None:
    """Copy a local file to `dst` (local or URI), atomically at `dst`; streams, so files may be large."""
    copy_file(str(Path(local_path).absolute()), dst)


def upload_dir(local_dir: str | os.PathLike, dst) -> None:
    """Copy the tree under `local_dir` into folder `dst`, overwriting files of the same name.

    Not atomic per file: meant for logs that only grow (TensorBoard event files), where a reader that
    catches a file mid-copy simply reads it again later.
    """
    fs, p = storage_fs(dst)
    _upload_tree(local_dir, fs, p)


def _upload_tree(local_dir: str | os.PathLike, fs, p: str) -> None:
    fs.create_dir(p, recursive=True)
    for folder, _, files in os.walk(local_dir):
        rel = os.path.relpath(folder, local_dir)
        target = p if rel == "." else f"{p.rstrip('/')}/{rel.replace(os.sep, '/')}"
        fs.create_dir(target, recursive=True)
        for name in files:
            with open(os.path.join(folder, name), "rb") as fin, fs.open_output_stream(f"{target}/{name}") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)


def publish_dir(local_dir: str | os.PathLike, dst) -> None:
    """Copy the local folder `local_dir` to folder `dst` (local or URI) so that `dst` appears whole
    (`published`): a temp folder next to it, then a rename (`atomic_dir` on local paths, `fs.move`
    elsewhere); on object stores a marker object last. An old `dst` is replaced. Used for epoch
    checkpoint folders, which resume must never find half-written."""
    if not is_uri(dst):
        with atomic_dir(dst) as tmp:
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        return
    fs, p = storage_fs(dst)
    if fs.type_name in _NATIVE_ATOMIC:  # an object store cannot rename a folder: a marker object, written last
        remove(join(dst, PUBLISHED))
        remove_dir(dst)
        _upload_tree(local_dir, fs, p)
        with fs.open_output_stream(f"{p.rstrip('/')}/{PUBLISHED}"):
            pass
        return
    tmp = _tmp_name(p.rstrip("/"))
    _upload_tree(local_dir, fs, tmp)
    remove_dir(dst)
    fs.move(tmp, p)


def published(path) -> bool:
    """True when folder `path` is whole: it exists (folders are renamed into place), or on an object
    store its `PUBLISHED` marker does (`publish_dir` writes it after every other file)."""
    fs, _ = storage_fs(path)
    return is_file(join(path, PUBLISHED)) if fs.type_name in _NATIVE_ATOMIC else is_dir(path)


@contextmanager
def staged_dir(path) -> Iterator[str]:
    """A local folder standing for folder `path`: `path` itself when local; for a URI a temp folder
    whose content is uploaded to `path` when the block ends (also on error: logs are kept)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        yield str(path)
        return
    local = tempfile.mkdtemp(prefix="kesi-staged-")
    try:
        yield local
    finally:
        try:
            upload_dir(local, path)
        finally:
            shutil.rmtree(local, ignore_errors=True)


# node-local copies of URI data (FFCV memory-maps local files); here so callers keep one import