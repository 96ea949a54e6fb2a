"""Object-store access: one place that turns a URL (s3://, gs://, file://, plain path) into a filesystem.

Paths are always URLs handled by fsspec, never string-joined `open()` calls, so the same code reads a laptop
folder and a bucket. S3 endpoints and credentials come from the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or from `storage_options`; neither is ever logged.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import posixpath
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec
import pyarrow.fs as pafs
from fsspec import AbstractFileSystem

from pipeline.core.errors import MaskdietError

log = logging.getLogger(__name__)


class StorageError(MaskdietError, RuntimeError):
    """An object store or folder could not be used; the message says which URL and what to check."""


class LockHeld(StorageError):
    """Another live run holds the output's lock; the message names it and how to clear a dead one."""


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it (no protocol)."""
    if not url:
        raise StorageError("empty URL: give a local path or an fsspec URL such as s3://bucket/prefix")
    options = dict(storage_options or {})
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol not in (None, "file", "local"):
        # Buckets change under us (other writers, the next scheduled run): a cached listing would hide new
        # objects, and s3fs even answers "not found" for an object missing from a cached parent listing.
        options.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # fsspec names the package: "Please install gcsfs to access Google Storage"
        raise StorageError(f"cannot open {url}: {e} (pip install it beside maskdiet)") from None
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        raise StorageError(f"cannot open {url}: {e} (a typo in the URL's scheme?)") from None
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
        with user_facing(url):  # access denied: a StorageError naming the credentials to check
            ok = fs.exists(path)
    except StorageError:
        raise
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
    if is_local(fs):
        with atomic_local_file(path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)


@contextlib.contextmanager
def atomic_local_file(path: str) -> Iterator[BinaryIO]:
    """A file to write for the local `path`, which it replaces only when the `with` body ends without an
    error: a temporary sibling, fsynced, then `os.replace` (atomic on POSIX); on an error it is removed."""
    parent = posixpath.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def user_facing(url: str) -> Iterator[None]:
    """Turn a missing object or a refused access at `url` (a path the user gave, or one a run wrote) into a
    `StorageError` naming it: a user can fix those; the raw OSError would read as a bug."""
    try:
        yield
    except FileNotFoundError:
        raise StorageError(f"not found: {url}") from None
    except PermissionError as e:
        raise StorageError(
            f"access denied to {url}: check the file's permissions, or AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY or storage_options for a bucket ({e})"
        ) from None


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object at `url`; a missing or forbidden one is a `StorageError` naming it."""
    fs, path = url_to_fs(url, storage_options)
    with user_facing(url):
        return fs.cat_file(path)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)


def absolute_url(url: str) -> str:
    """`url` unchanged when it has a scheme (`s3://...`), else the local path with `~` expanded, made absolute.

    Ray's worker processes and Tune's trials run in other folders than the driver: a relative path handed to
    them would name another place."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def read_json_lines(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The records of a JSON-lines object such as a run's metrics.jsonl; empty when it does not exist (yet)."""
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        return []
    text = fs.cat_file(path).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def ray_storage(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[str, pafs.FileSystem | None]:
    """`(storage_path, storage_filesystem)` for a Ray Train or Tune `RunConfig` that keeps its runs under `url`.

    A local folder is an absolute path with no filesystem (Ray's default). An object store goes through our
    fsspec filesystem wrapped for pyarrow, so Ray reaches the same endpoint and credentials as every other
    read (`pyarrow_filesystem` says why pyarrow's own S3 does not)."""
    fs, path = url_to_fs(url, storage_options)
    if is_local(fs):
        return os.path.abspath(path), None
    return path, pyarrow_filesystem(fs)


# ---------------------------------------------------------------------------------------------- output lock

LOCK_NAME = ".maskdiet.lock"


def _create_exclusive(fs: AbstractFileSystem, path: str, body: bytes) -> bool:
    """Create `path` holding `body` only if it does not exist; False when it does.

    Local: the body goes to a private file first, then `os.link` gives it the name, which fails if the name
    exists: a reader never sees the lock without its body (and would take an empty one as stale). S3: a
    conditional PUT (`If-None-Match: *`), which S3 and moto honour.
    """
    if is_local(fs):
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lock-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.chmod(tmp, 0o644)  # as a plain create would make it: other users may read who holds it
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links (vfat, some FUSE mounts): create in place
            return _create_in_place(path, body)
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, body, mode="create")
    except FileExistsError:
        return False
    except TypeError:  # a filesystem without exclusive create: best effort
        if fs.exists(path):
            return False
        fs.pipe_file(path, body)
    return True


def _create_in_place(path: str, body: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    return True


def _read_lock(fs: AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign lock file: treat as stale
        return {}


def _is_stale(holder: dict[str, Any], stale_after: float) -> bool:
    """A lock is stale when its process is gone (same host) or it is older than `stale_after` seconds."""
    if not holder:
        return True
    if time.time() - float(holder.get("time", 0)) > stale_after:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


@contextlib.contextmanager
def output_lock(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    wait: float = 60.0,
    stale_after: float = 600.0,
    poll: float = 0.5,
) -> Iterator[None]:
    """Hold `<url>/.maskdiet.lock` while a run writes its set of files into `url`.

    Each file is written atomically on its own; the lock makes the *set* (manifest + quarantine) come from
    one run when two runs target the same output: the second waits up to `wait` seconds, then is refused
    with `LockHeld`. A lock left by a killed run is broken when its process is gone (same host) or it is
    older than `stale_after` seconds (hold it only for the short commit, so that bound is generous).
    """
    fs, root = url_to_fs(url, storage_options)
    path = posixpath.join(root.rstrip("/"), LOCK_NAME)
    owner = uuid.uuid4().hex
    body = json.dumps(
        {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
            "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    ).encode()
    deadline = time.monotonic() + wait
    while True:
        try:
            created = _create_exclusive(fs, path, body)
        except PermissionError as e:
            raise StorageError(f"cannot write to {url}: access denied ({e})") from None
        if created:
            break
        holder = _read_lock(fs, path)
        if holder is None:
            continue  # released between our attempt and the read: try again at once
        if holder.get("owner") == owner:
            break  # our own create went through, its answer was lost and the retry saw our lock
        if _is_stale(holder, stale_after):
            # Another waiter may have broken it and taken the lock since we read it: remove only the same one.
            if _read_lock(fs, path) == holder:
                log.warning(
                    "breaking a stale lock on %s (pid %s on %s)", url, holder.get("pid"), holder.get("host")
                )
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
            continue
        if time.monotonic() >= deadline:
            raise LockHeld(
                f"output {url} is being written by another maskdiet run (pid {holder.get('pid')} on "
                f"{holder.get('host')} since {holder.get('since')}); wait for it, or if that run is dead "
                f"delete {to_url(fs, path)}"
            )
        time.sleep(poll)
    try:
        yield
    finally:
        holder = _read_lock(fs, path)
        if holder is not None and holder.get("owner") == owner:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)
