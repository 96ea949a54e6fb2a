"""Input formats: where an input's images live, how one image is named, how a stored label becomes a class.

Three formats (`data.format`; `auto` decides with `detect_format`):

- `folder`: one object per image, `<root>/<class>/<file>` (`stages/read.py`). A row's `path` is the
  object's URL.
- `webdataset`: `.tar` shards (`stages/read_webdataset.py`), named by a prefix, one shard, a glob or a
  brace pattern (`s3://b/train-{000000..000099}.tar`). A sample is the members that share a key (the
  member name up to the first dot of its file name); its `path` is `<shard URL>#<key>`.
- `parquet`: tables with an image column (`stages/read_parquet.py`), named by a prefix, one file, a glob
  or a brace pattern. A row's `path` is `<table URL>#<row>`, its 0-based row index in that table.

Whatever the format, a manifest row names its image by that `path` plus the `sha256` of the image's bytes,
so the score cache, incremental runs and pretraining work the same for every format; `split_member` tells a
container member from a plain object. Shards and tables are read by Ray Data tasks, one shard or one
Parquet row group per task (`ContainerListing`).

Labels in shards and tables are integers (a `.cls` member, an integer column or JSON field), or class
names (text): `label_of` turns one into (label, class name) with `data.classes`, and `finish_labels`
numbers the names that no `data.classes` named, once every row is read.
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core.config import DataConfig
from pipeline.core.errors import UserInputError
from pipeline.core.runtime import is_transient, retry_pause
from pipeline.core.storage import StorageError, check_readable, to_url, url_to_fs

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # gzip-compressed shards are read too (tarfile's "r|*")
PARQUET_SUFFIXES = (".parquet",)
IMAGE_SUFFIXES_FOR_AUTO = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")

# What a container listing hands the first stage, one row per read unit: the container's URL, the part
# read (a Parquet row group; -1: the whole shard) and the row index of its first row (0 for shards).
UNIT_COLUMNS = ("container", "part", "first_row")
# What a container reader makes of a unit, one row per sample: the image `bytes` (None when there are
# none), and `read_reason` / `read_error`: a quarantine reason and message decided before decoding
# ("" when the sample is fine so far). `stages.decode.DecodeStage` turns those into quarantine rows.
SAMPLE_COLUMNS = ("path", "label", "class_name", "bytes", "read_reason", "read_error")

# Quarantine reasons a container reader decides (besides decode's own, e.g. `truncated`, `missing`).
CONTAINER_REASONS = ("no-image", "missing-label", "bad-label", "duplicate-key")

T = TypeVar("T")


class SampleFault(Exception):
    """A sample that cannot become a manifest row; `reason` is a quarantine reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FormatError(UserInputError):
    """The input cannot be read as the format asked for (or detected); the message says what to set."""


# ------------------------------------------------------------------------------------------ member paths


def is_container(url: str) -> bool:
    return url.lower().endswith(TAR_SUFFIXES + PARQUET_SUFFIXES)


def is_tar(url: str) -> bool:
    return url.lower().endswith(TAR_SUFFIXES)


def member_path(container: str, key: str | int) -> str:
    """The manifest `path` of a sample in a shard (`key`) or a row of a table (row index)."""
    return f"{container}#{key}"


def split_member(path: str) -> tuple[str, str] | None:
    """(container URL, key or row) for a shard sample or table row (`x.tar#key`, `t.parquet#17`); None for a
    plain object's path (a folder's image, even one with `#` in its name)."""
    container, sep, key = path.rpartition("#")
    if sep and key and is_container(container):
        return container, key
    return None


# ---------------------------------------------------------------------------------------------- patterns


def _top_level_split(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """The names a brace pattern stands for, in order, as webdataset (braceexpand) and bash expand them:
    `{000..003}` is a zero-padded range, `{a,b}` alternatives, nested braces allowed.

    >>> expand_braces("s3://b/train-{00..02}.tar")
    ['s3://b/train-00.tar', 's3://b/train-01.tar', 's3://b/train-02.tar']
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise FormatError(f"unbalanced '{{' in the input pattern {pattern!r}")
    head, inner, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    match = _RANGE.match(inner)
    if match:
        first, last = int(match[1]), int(match[2])
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in match.groups())
        width = max(len(match[1]), len(match[2])) if padded else 0
        step = 1 if last >= first else -1
        options = [f"{i:0{width}d}" for i in range(first, last + step, step)]
    else:
        options = [x for part in _top_level_split(inner) for x in expand_braces(part)]
        if len(options) < 2 and "," not in inner:
            raise FormatError(f"{{{inner}}} in the input pattern {pattern!r} is neither a..b nor a,b")
    rests = expand_braces(tail)
    return [head + option + rest for option in options for rest in rests]


def is_hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


# ------------------------------------------------------------------------------------------ finding files


@dataclass(frozen=True)
class Found:
    """The files an input URL names: under a prefix (every file, hidden names left out) or named one by one
    (one file, a glob or a brace pattern). Paths are `fs` paths (no protocol), sorted."""

    fs: Any
    root: str  # the prefix's fs path; for named files, their common folder
    files: list[str]
    named: bool  # the URL named files (a file, glob or pattern) rather than a folder to search

    def url(self, path: str) -> str:
        return to_url(self.fs, path)


def find_inputs(data: DataConfig) -> Found:
    """Every file `data.input` names. A brace pattern expands to names that must all exist; a glob
    (`*`, `?`) lists what matches; a file is itself; anything else is a prefix searched recursively.
    Raises StorageError / FormatError with the URL."""
    url, so = data.input, data.storage_options
    if "{" in url or "}" in url:
        names = expand_braces(url)
        fs, first = url_to_fs(names[0], so)
        paths = [url_to_fs(n, so)[1] for n in names]
        present = _existing(fs, paths)
        missing = [n for n, p in zip(names, paths, strict=True) if p not in present]
        if missing:
            raise StorageError(
                f"{len(missing)} of the {len(names)} files named by {url} do not exist, e.g. {missing[0]}"
            )
        return Found(fs, posixpath.dirname(first), sorted(set(paths)), named=True)
    if "*" in url or "?" in url:
        fs, path = url_to_fs(url, so)
        files = sorted(p for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file")
        if not files:
            raise StorageError(f"nothing matches {url}")
        return Found(fs, posixpath.dirname(path.split("*")[0].split("?")[0]), files, named=True)
    check_readable(url, so)
    fs, path = url_to_fs(url, so)
    if fs.isfile(path):
        return Found(fs, posixpath.dirname(path), [path], named=True)
    root = path.rstrip("/")
    files = sorted(p for p in fs.find(root) if not is_hidden(posixpath.relpath(p, root)))
    return Found(fs, root, files, named=False)


def check_input(data: DataConfig) -> None:
    """Fail early (StorageError, with the URL) when `data.input` cannot be reached: for a brace or glob
    pattern, the folder it is in."""
    url = data.input
    head = re.split(r"[{*?]", url, maxsplit=1)[0]
    if head != url:
        url = head.rsplit("/", 1)[0] if "/" in head.partition("://")[2] or "://" not in head else head
    check_readable(url, data.storage_options)


def _existing(fs: Any, paths: list[str]) -> set[str]:
    """Which of `paths` exist: one listing per folder they are in, not one request per file."""
    present: set[str] = set()
    for folder in sorted({posixpath.dirname(p) for p in paths}):
        try:
            present.update(p.rstrip("/") for p in fs.ls(folder, detail=False))
        except FileNotFoundError:
            continue
    return present


def detect_format(data: DataConfig, found: Found) -> str:
    """`data.format`, or for `auto` what the files are: `.tar` shards → webdataset, `.parquet` tables (and
    no image files beside them) → parquet, else folder. A prefix holding both shards and image files is
    ambiguous: set `data.format`."""
    if data.format != "auto":
        return data.format
    lower = [p.lower() for p in found.files]
    tars = sum(p.endswith(TAR_SUFFIXES) for p in lower)
    tables = sum(p.endswith(PARQUET_SUFFIXES) for p in lower)
    images = sum(p.endswith(IMAGE_SUFFIXES_FOR_AUTO) for p in lower)
    if tars and images:
        raise FormatError(
            f"{data.input} holds both .tar shards ({tars}) and image files ({images}): "
            "set data.format=webdataset or data.format=folder"
        )
    if tars:
        return "webdataset"
    if tables and not images:
        return "parquet"
    if found.named and not images:
        raise FormatError(
            f"{data.input} names no .tar shards, .parquet tables or images; set data.format, or give a folder"
        )
    return "folder"


# -------------------------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class ContainerListing:
    """What a shard or table listing found: the read units (`UNIT_COLUMNS`), one Ray task each."""

    root: str  # the input URL
    format: str  # webdataset | parquet
    units: pd.DataFrame  # container, part, first_row
    containers: int  # shards or tables
    expected_rows: int | None = None  # samples in all units, when known before reading (Parquet)
    classes: list[str] = field(default_factory=list)  # data.classes; otherwise known once read

    def __len__(self) -> int:
        return len(self.units)

    def blocks(self) -> list[pa.Table]:
        """One block per unit, so Ray Data gives each unit its own task."""
        return [
            pa.Table.from_pandas(self.units.iloc[i : i + 1], preserve_index=False)
            for i in range(len(self.units))
        ]


def with_retries(read: Callable[[], T], what: str, attempts: int = 4) -> T:
    """`read()`, again after a transient object-store error (`runtime.is_transient`) with backoff; other
    errors are raised at once."""
    for attempt in range(attempts):
        try:
            return read()
        except Exception as e:
            if not is_transient(e) or attempt + 1 == attempts:
                raise
            log.warning("retrying %s after %s: %s", what, type(e).__name__, e)
            time.sleep(retry_pause(attempt))
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ labels


@dataclass(frozen=True)
class LabelOptions:
    """How a stored label becomes (label, class name); picklable for Ray tasks."""

    classes: tuple[str, ...] | None = None  # data.classes
    missing: str = "quarantine"  # data.missing_label

    @classmethod
    def from_config(cls, data: DataConfig) -> LabelOptions:
        return cls(tuple(data.classes) if data.classes else None, data.missing_label)


def label_of(value: Any, options: LabelOptions, source: str) -> tuple[int, str]:
    """(label, class name) of a stored label; raises SampleFault (`missing-label`, `bad-label`).

    An integer is the label (named `data.classes[label]`, else its digits); -1 is unlabeled. A text value is
    a class name: its index in `data.classes`, or label -1 with the name kept until `finish_labels`
    numbers the names. `source` says where the value came from, for the message."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        if options.missing == "unlabeled":
            return -1, ""
        raise SampleFault(
            "missing-label", f"no label ({source}); data.missing_label=unlabeled keeps it as -1"
        )
    if isinstance(value, bool) or not isinstance(value, int | float | str | np.integer | np.floating):
        raise SampleFault("bad-label", f"{source} is {value!r:.60}, not an integer or a class name")
    if isinstance(value, float | np.floating):
        if not float(value).is_integer():
            raise SampleFault("bad-label", f"{source} is {value!r}, not an integer")
        value = int(value)
    if isinstance(value, str):
        name = value.strip()
        if not name:
            return label_of(None, options, source)
        if options.classes is None:
            return -1, name
        if name not in options.classes:
            raise SampleFault("bad-label", f"{source} {name!r} is not one of data.classes")
        return options.classes.index(name), name
    label = int(value)
    if label == -1:
        return -1, ""
    if label < -1:
        raise SampleFault("bad-label", f"{source} is {label}: labels are integers ≥ -1 (-1: unlabeled)")
    if options.classes is None:
        return label, str(label)
    if label >= len(options.classes):
        raise SampleFault("bad-label", f"{source} is {label}, but data.classes names {len(options.classes)}")
    return label, options.classes[label]


def finish_labels(frame: pd.DataFrame, data: DataConfig) -> tuple[pd.DataFrame, list[str]]:
    """The rows with every label numbered, and the classes (label i is classes[i]).

    With `data.classes` the readers numbered them already. Otherwise class names (text labels, kept with
    label -1 by `label_of`) are sorted and numbered, and integer labels 0..max are named "0".."max". A set
    that mixes the two needs `data.classes`."""
    if data.classes:
        return frame, list(data.classes)
    labels = frame["label"].to_numpy(dtype=np.int64)
    names = frame["class_name"].fillna("").astype(str).to_numpy()
    named = (labels == -1) & (names != "")
    if named.any() and (labels >= 0).any():
        raise FormatError(
            f"{data.input} mixes integer labels and class names (e.g. {names[named][0]!r}); "
            "set data.classes to name the integers"
        )
    frame = frame.copy()
    if named.any():
        classes = sorted(set(names[named]))
        index = {c: i for i, c in enumerate(classes)}
        frame["label"] = np.where(named, [index.get(n, -1) for n in names], labels).astype(np.int64)
        return frame, classes
    top = int(labels.max()) if len(labels) else -1
    return frame, [str(i) for i in range(top + 1)]
