"""WebDataset shards: `.tar` files whose members are grouped into samples by key, read over fsspec.

The conventions are webdataset's: a member `dir/000123.seg.png` belongs to the sample with key
`dir/000123` (the name up to the first dot of its file name) as field `seg.png`; the members of a sample
are adjacent in the tar; names starting and ending with `__` are metadata, not samples. A sample's image is
its first `jpg`, `jpeg`, `png` or `webp` member (in that order); its label is the integer text of its `cls`
member or, with `data.label_field`, that field of its `json` member (an integer or a class name: see
`stages.formats.label_of`).

A shard is read as one stream (`tarfile` mode `r|*`, gzip too) through fsspec, so it works the same on a
laptop and on any object store: one request stream per shard, not one GET per image. `ReadShards` is the
map stage curation runs, one Ray task per shard: every sample becomes a row (`stages.formats.SAMPLE_COLUMNS`),
a bad one with its quarantine reason (`no-image`, `missing-label`, `bad-label`, `duplicate-key`; a shard
cut short quarantines the sample it was in as `truncated`; a shard that is no tar at all is one row with its
own URL as path). `shard_images` is what the training stream reads: every image of one shard by key.
"""

from __future__ import annotations

import gzip
import json
import logging
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.core.storage import url_to_fs
from stages.base import Batch, Stage
from stages.formats import (
    SAMPLE_COLUMNS,
    UNIT_COLUMNS,
    LabelOptions,
    SampleFault,
    label_of,
    member_path,
    with_retries,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image: the first of these it has
STREAM_BLOCK = 8 * 2**20  # bytes fetched per request while streaming a shard from an object store

# webdataset's own split of a member name into (key, field): the field starts at the file name's first dot
_KEY_AND_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class Sample:
    """The members of one sample: `fields` read (field → bytes), `skipped` the names of those not read."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return name in self.fields or name in self.skipped


class ShardBroken(Exception):
    """The tar stream could not be read on: `key` is the sample being read then (None: before the first),
    `reason` a quarantine reason (`empty`, `truncated`, `corrupt`)."""

    def __init__(self, key: str | None, reason: str, message: str) -> None:
        super().__init__(message)
        self.key, self.reason = key, reason


def _broken_reason(error: BaseException) -> str:
    text = str(error).lower()
    if "empty file" in text:
        return "empty"
    if "unexpected end" in text or "truncated" in text or isinstance(error, EOFError):
        return "truncated"
    return "corrupt"


def iter_samples(fileobj: Any, read: Callable[[str, str], bool]) -> Iterator[Sample]:
    """The samples of the tar stream `fileobj`, in order. A member's bytes are read when `read(key, field)`
    says so (the others only named). A new sample starts when the key changes or a field repeats, as in
    webdataset. Raises ShardBroken when the stream is damaged; the samples before it were yielded whole."""
    current: Sample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                if base.startswith("__") and base.endswith("__"):
                    continue
                match = _KEY_AND_FIELD.match(member.name)
                if match is None:  # no dot in the file name: not a sample member
                    continue
                key, name = match[1], match[2].lower()
                if current is None or key != current.key or current.has(name):
                    if current is not None:
                        yield current
                    current = Sample(key)
                if read(key, name):
                    handle = tar.extractfile(member)
                    current.fields[name] = handle.read() if handle is not None else b""
                else:
                    current.skipped.append(name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ShardBroken(
            current.key if current else None, _broken_reason(e), f"{type(e).__name__}: {e}"
        ) from None
    if current is not None:
        yield current


def _open(url: str, storage_options: dict[str, Any]) -> Any:
    fs, path = url_to_fs(url, storage_options)
    return fs.open(path, "rb", block_size=STREAM_BLOCK)


# ------------------------------------------------------------------------------------------ curation rows


@dataclass(frozen=True)
class ShardOptions:
    """What reading a shard for curation needs (picklable for Ray tasks)."""

    storage_options: dict[str, Any]
    label_field: str | None = None  # data.label_field; None: the cls member
    labels: LabelOptions = field(default_factory=LabelOptions)
    attempts: int = 4

    @classmethod
    def from_config(cls, data: DataConfig) -> ShardOptions:
        return cls(dict(data.storage_options), data.label_field, LabelOptions.from_config(data))


def _label(sample: Sample, options: ShardOptions) -> tuple[int, str]:
    if options.label_field is None:
        raw = sample.fields.get("cls")
        if raw is None:
            return label_of(None, options.labels, "the sample has no .cls member")
        text = raw.decode("utf-8", "replace").strip()
        try:
            value = int(text)
        except ValueError:
            raise SampleFault(
                "bad-label", f".cls is {text!r:.40}, not an integer (class names go in data.label_field)"
            ) from None
        return label_of(value, options.labels, ".cls")
    raw = sample.fields.get("json")
    if raw is None:
        return label_of(None, options.labels, "the sample has no .json member")
    try:
        document = json.loads(raw)
    except ValueError as e:
        raise SampleFault("bad-label", f".json is not valid JSON: {e}") from None
    if not isinstance(document, dict) or options.label_field not in document:
        return label_of(None, options.labels, f".json has no field {options.label_field!r}")
    return label_of(document[options.label_field], options.labels, f".json field {options.label_field!r}")


def _row(path: str, label: int, name: str, data: bytes | None, reason: str = "", error: str = "") -> dict:
    return {"path": path, "label": label, "class_name": name, "bytes": data, "read_reason": reason,
            "read_error": error[:500]}  # fmt: skip


def _sample_row(url: str, sample: Sample, options: ShardOptions) -> dict:
    path = member_path(url, sample.key)
    image = next((e for e in IMAGE_EXTENSIONS if e in sample.fields), None)
    if image is None:
        present = ", ".join(sorted({*sample.fields, *sample.skipped})) or "none"
        return _row(
            path, -1, "", None, "no-image", f"no {'/'.join(IMAGE_EXTENSIONS)} member (members: {present})"
        )
    data = sample.fields[image]
    try:
        label, name = _label(sample, options)
    except SampleFault as e:
        return _row(path, -1, "", data, e.reason, str(e))
    return _row(path, label, name, data)


def shard_rows(url: str, options: ShardOptions) -> list[dict]:
    """One row per sample of the shard at `url` (`SAMPLE_COLUMNS`), bad ones with their reason; a shard
    that is missing or no readable tar is one row with the shard's URL as path. Transient object-store
    errors restart the shard (`with_retries`)."""
    label_field = "json" if options.label_field else "cls"

    def wanted(_key: str, name: str) -> bool:
        return name in IMAGE_EXTENSIONS or name == label_field

    def read() -> list[dict]:
        rows: list[dict] = []
        seen: set[str] = set()
        try:
            with _open(url, options.storage_options) as f:
                for sample in iter_samples(f, wanted):
                    if sample.key in seen:
                        message = "a second sample with this key in the shard; the first is used"
                        rows.append(
                            _row(member_path(url, sample.key), -1, "", None, "duplicate-key", message)
                        )
                        continue
                    seen.add(sample.key)
                    rows.append(_sample_row(url, sample, options))
        except ShardBroken as e:
            message = f"the shard ends or breaks here: {e}"
            if e.key is None or e.key in seen:
                rows.append(_row(url, -1, "", None, e.reason, f"not a readable tar shard: {e}"))
            else:
                rows.append(_row(member_path(url, e.key), -1, "", None, "truncated", message))
        return rows

    try:
        return with_retries(read, f"shard {url}", options.attempts)
    except FileNotFoundError:
        return [_row(url, -1, "", None, "missing", "the shard was deleted since it was listed")]


def rows_to_batch(rows: list[dict]) -> Batch:
    """Sample rows (dicts of `SAMPLE_COLUMNS`) as one batch of numpy columns."""
    out: Batch = {}
    for name in SAMPLE_COLUMNS:
        values = [r[name] for r in rows]
        if name == "label":
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[name] = column
    return out


class ReadShards(Stage):
    """Map stage: shard URLs (`stages.formats.UNIT_COLUMNS`, one row per shard) → one row per sample
    (`SAMPLE_COLUMNS`): image bytes, label, class name, and a quarantine reason decided before decoding
    (see the module docstring). Run one shard per call (`batch_size=None` over one-shard blocks)."""

    name = "read-shards"
    inputs = UNIT_COLUMNS
    outputs = SAMPLE_COLUMNS
    passthrough = False

    def __init__(self, options: ShardOptions) -> None:
        self.options = options

    def process(self, batch: Batch) -> Batch:
        rows = [row for url in batch["container"] for row in shard_rows(str(url), self.options)]
        return rows_to_batch(rows)


# ------------------------------------------------------------------------------------------ training reads


def shard_images(url: str, storage_options: dict[str, Any], attempts: int = 4) -> dict[str, bytes]:
    """Every sample's image in the shard at `url`, by key (the first sample of a repeated key). A shard
    damaged part way gives the images before the damage (with a warning); a missing one, none."""

    def wanted(_key: str, name: str) -> bool:
        return name in IMAGE_EXTENSIONS

    def read() -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        try:
            with _open(url, storage_options) as f:
                for sample in iter_samples(f, wanted):
                    image = next((e for e in IMAGE_EXTENSIONS if e in sample.fields), None)
                    if image is not None:
                        found.setdefault(sample.key, sample.fields[image])
        except ShardBroken as e:
            log.warning("%s: %s (%d images read before it)", url, e, len(found))
        return found

    try:
        return with_retries(read, f"shard {url}", attempts)
    except FileNotFoundError:
        log.warning("%s: deleted since it was listed", url)
        return {}
