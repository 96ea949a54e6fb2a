"""Object-store access: one place that turns a URL (s3://, gs://, file://, plain path) into a filesystem.

Paths are always URLs handled by fsspec, never string-joined `open()` calls, so the same code reads a laptop
folder and a bucket. S3 endpoints and credentials come from the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or from `storage_options`; neither is ever logged.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec import AbstractFileSystem


class StorageError(RuntimeError):
    """An object store or folder could not be used; the message says which URL and what to check."""


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it (no protocol)."""
    if not url:
        raise StorageError("empty URL: give a local path or an fsspec URL such as s3://bucket/prefix")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def is_local(fs: AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """A full URL for `path` on `fs`: plain absolute paths for local files, `s3://...` for S3."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def join(url: str, *parts: str) -> str:
    """Join URL path segments with '/', keeping the protocol (`s3://b/p` + `x` → `s3://b/p/x`)."""
    if "://" in url:
        proto, _, rest = url.partition("://")
        return f"{proto}://{posixpath.join(rest, *parts)}"
    return os.path.join(url, *parts)


def pyarrow_filesystem(fs: AbstractFileSystem) -> pafs.FileSystem:
    """Wrap an fsspec filesystem for pyarrow / Ray Data.

    pyarrow's own S3FileSystem ignores `AWS_ENDPOINT_URL` (it resolves the AWS host), while s3fs honours
    it; wrapping the fsspec filesystem keeps one source of truth for endpoints and credentials.
    """
    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def check_readable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail early with a clear message when `url` cannot be listed (missing bucket, bad credentials)."""
    fs, path = url_to_fs(url, storage_options)
    try:
        ok = fs.exists(path)
    except PermissionError as e:
        raise StorageError(
            f"access denied to {url}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage_options ({e})"
        ) from None
    except Exception as e:  # botocore and gcsfs raise their own types
        raise StorageError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if not ok:
        raise StorageError(f"input not found: {url} (no such folder, bucket or prefix)")


def atomic_write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write `data` to `url` so that a reader sees either the old object or the whole new one.

    Local files: write a temporary sibling, fsync, then `os.replace` (atomic on POSIX). Object stores:
    one PUT of the whole body, which S3 and GCS make visible atomically.
    """
    fs, path = url_to_fs(url, storage_options)
    parent = posixpath.dirname(path)
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = url_to_fs(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)
