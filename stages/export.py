"""Export: a manifest's kept images as shards other loaders read (`curate --export webdataset|parquet`).

    manifest rows (kept) ─ sorted by path, numbered ─ cut into shards of N images
      → one Ray task per shard: read the original bytes (`stages.read.ReadBytes`), write one shard atomically
      → `_export.json` (shard list, brace pattern, counts), stale shards of an earlier export removed

- `webdataset`: `<prefix>-000000.tar`, ... Each sample is `<key>.<ext>` (the original bytes; ext from their
  leading bytes: jpg, png or webp, the image members webdataset loaders and `stages.read_webdataset` take;
  any other format, e.g. gif, bmp or tiff, is re-encoded losslessly to png), `<key>.cls` (the integer label;
  left out when unlabeled) and `<key>.json` (source `path`, `sha256` of the exported bytes, `source_sha256`
  when re-encoded, `label`, `class_name`, `score` and the computed score columns): the layout
  webdataset-based loaders take; `maskdiet run --set data.input='<folder>/kept-{000000..000003}.tar'` reads
  them as they are.
- `parquet`: `<prefix>-000000.parquet`, ... with `image` as the Hugging Face `{bytes, path}` struct (the
  original bytes: PIL-based readers open any format), `label`, `class_name`, `path`, `sha256` and the
  score columns; `datasets`, pandas and `stages.read_parquet` read them.

A key is the row's zero-padded index among the kept rows sorted by path: it has no dot (webdataset's key
ends at the first dot) and does not change when another row is skipped. Rows sorted by path and tar
members written with fixed metadata make a rerun over the same manifest write the same bytes. Shards are
numbered contiguously, so one brace pattern names them all; a rerun that writes fewer removes the
higher-numbered ones left from before, which a prefix listing would otherwise still find.

A kept row whose bytes cannot be read any more (deleted since curation), or no longer hash to the manifest's
`sha256` (replaced since), is skipped with a warning and counted, not exported under another image's scores.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from pipeline.core.config import DataConfig, ExportConfig
from pipeline.core.runtime import cluster_cpus
from pipeline.core.storage import atomic_write_bytes, join, url_to_fs
from stages.formats import split_member
from stages.read import ReadBytes, read_parts

log = logging.getLogger(__name__)

INDEX_NAME = "_export.json"  # hidden from prefix listings (a leading `_`), as the readers skip sidecars
SCORE_COLUMNS = ("el2n", "el2n_std", "grand", "forgetting", "prototype")
SIZE_SAMPLE = 32  # kept images read on the driver to size shards from `shard_mib`
READ_CHUNK = 64  # objects one shard task reads per request round (container members: a shard or row group)
ROW_GROUP_BYTES = 32 * 2**20  # Parquet row groups of about this many image bytes: the readers' unit of work
TAR_OVERHEAD = 3 * 1024  # per sample: three 512-byte member headers, padding, the .cls and .json bodies
FALLBACK_PER_SHARD = 1000  # when no sampled image could be read to measure
SHARD_DIGITS = 6
EXAMPLES = 20  # skipped rows named one by one in the log and the index

PARQUET_SCHEMA = pa.schema(
    [
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),  # Hugging Face Image
        ("label", pa.int64()),  # -1 when unlabeled
        ("class_name", pa.string()),
        ("path", pa.string()),  # where the image was curated from
        ("sha256", pa.string()),  # of `image.bytes`
        ("score", pa.float64()),
        *((name, pa.float64()) for name in SCORE_COLUMNS),
    ]
)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: `pattern` names every shard (`{000000..000003}`), `bytes` is their total size."""

    format: str  # webdataset | parquet
    folder: str
    shards: list[str]
    pattern: str  # "" when nothing was kept
    samples: int
    bytes: int
    skipped: int  # kept rows not exported: deleted or changed since curation
    per_shard: int

    @property
    def index_url(self) -> str:
        return join(self.folder, INDEX_NAME)


@dataclass(frozen=True)
class ShardOutcome:
    """One shard task's answer (small: it travels back to the driver)."""

    url: str
    samples: int
    bytes: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


# ---------------------------------------------------------------------------------------------- bytes


def image_extension(data: bytes) -> str | None:
    """`jpg`, `png` or `webp` from the leading bytes; None for any other format."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def to_png(data: bytes) -> bytes:
    """The first frame of an image PNG cannot hold as it is (gif, bmp, tiff, ...), as PNG: lossless for the
    pixel modes PNG stores (the usual ones); others (CMYK, YCbCr) go to RGB(A) first."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        image.load()
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue()


def sample_extension(data: bytes) -> str:
    """The extension an image is stored under in an export: its own, or `png` once re-encoded."""
    return image_extension(data) or "png"


# ---------------------------------------------------------------------------------------------- planning


def kept_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The kept rows sorted by path, each with its export `key` (zero-padded index in that order)."""
    frame = manifest
    if "kept" in frame.columns:
        frame = frame[frame["kept"].fillna(False).astype(bool)]
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    width = max(9, len(str(len(frame))))
    frame["key"] = [f"{i:0{width}d}" for i in range(len(frame))]
    return frame


def size_sample(paths: Sequence[str], count: int = SIZE_SAMPLE) -> list[int]:
    """Row indices to measure image sizes on: evenly spaced for plain objects; for shard samples and table
    rows, consecutive rows from the middle one's container, so the driver reads one shard or a row group or
    two, not one whole shard per sampled image."""
    if not paths:
        return []
    middle = len(paths) // 2
    member = split_member(paths[middle])
    if member is None:
        return sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))})

    def container_of(i: int) -> str | None:
        found = split_member(paths[i])
        return found[0] if found else None

    container, start = member[0], middle
    while start > 0 and container_of(start - 1) == container:
        start -= 1
    return [i for i in range(start, min(start + count, len(paths))) if container_of(i) == container]


def images_per_shard(rows: pd.DataFrame, export: ExportConfig, data: DataConfig) -> int:
    """`export.samples_per_shard`, else as many images as fill `export.shard_mib` at the mean size of a
    few kept images read here."""
    if export.samples_per_shard:
        return export.samples_per_shard
    paths = rows["path"].astype(str).tolist()
    chosen = [paths[i] for i in size_sample(paths)]
    blobs = ReadBytes.for_data(data)({"path": np.asarray(chosen, dtype=object)})["bytes"]
    sizes = [len(b) for b in blobs if b is not None]
    if not sizes:
        log.warning("none of %d sampled kept images could be read to size shards", len(chosen))
        return FALLBACK_PER_SHARD
    overhead = TAR_OVERHEAD if export.format == "webdataset" else 64
    mean = float(np.mean(sizes)) + overhead
    per_shard = max(1, int(export.shard_mib * 2**20 // mean))
    log.info(
        "export: %d images per shard (mean %.1f KiB over %d sampled, shard_mib=%g)",
        per_shard,
        mean / 1024,
        len(sizes),
        export.shard_mib,
    )
    return per_shard


def shard_name(prefix: str, number: int, fmt: str) -> str:
    return f"{prefix}-{number:0{SHARD_DIGITS}d}.{'tar' if fmt == 'webdataset' else 'parquet'}"


def brace_pattern(folder: str, prefix: str, count: int, fmt: str) -> str:
    """The brace pattern naming shards 0..count-1 (`kept-{000000..000003}.tar`); "" when there are none."""
    if count == 0:
        return ""
    suffix = "tar" if fmt == "webdataset" else "parquet"
    last = f"{count - 1:0{SHARD_DIGITS}d}"
    first = "0" * len(last)
    return join(folder, f"{prefix}-{{{first}..{last}}}.{suffix}")


# ---------------------------------------------------------------------------------------------- one shard


def _records(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Plain picklable rows for a shard task: path, key, sha256, label, class_name, score columns (None when
    not computed)."""
    out = []
    for row in rows.to_dict("records"):
        record = {
            "path": str(row["path"]),
            "key": str(row["key"]),
            "sha256": str(row.get("sha256") or ""),
            "label": int(row["label"]) if pd.notna(row.get("label")) else -1,
            "class_name": "" if pd.isna(row.get("class_name")) else str(row.get("class_name")),
        }
        for name in ("score", *SCORE_COLUMNS):
            value = row.get(name)
            record[name] = float(value) if value is not None and pd.notna(value) else None
        out.append(record)
    return out


def _read(records: list[dict[str, Any]], data: DataConfig) -> list[bytes | None]:
    """Each record's original bytes (None: gone), read as the training stream reads them: a shard or Parquet
    row group once for all its rows, plain objects `READ_CHUNK` per request round."""
    paths = [r["path"] for r in records]
    read = ReadBytes.for_data(data)
    found: list[bytes | None] = [None] * len(paths)
    for part in read_parts(paths, data, READ_CHUNK):
        blobs = read({"path": np.asarray([paths[i] for i in part], dtype=object)})["bytes"]
        for i, blob in zip(part.tolist(), blobs, strict=True):
            found[i] = bytes(blob) if blob is not None else None
    return found


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o644, 0  # fixed metadata: a rerun writes the same bytes
    tar.addfile(info, io.BytesIO(payload))


def _metadata(record: dict[str, Any], sha: str, reencoded: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {"path": record["path"], "sha256": sha}
    if reencoded:
        meta["source_sha256"] = record["sha256"]
    meta.update(label=record["label"], class_name=record["class_name"], score=record["score"])
    meta.update({n: record[n] for n in SCORE_COLUMNS if record[n] is not None})
    return meta


def _tar_shard(samples: list[tuple[dict[str, Any], bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for record, data in samples:
            ext = image_extension(data)
            image = data if ext else to_png(data)
            sha = hashlib.sha256(image).hexdigest()
            key = record["key"]
            _tar_member(tar, f"{key}.{ext or 'png'}", image)
            if record["label"] >= 0:
                _tar_member(tar, f"{key}.cls", str(record["label"]).encode())
            meta = _metadata(record, sha, reencoded=ext is None)
            _tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    return buffer.getvalue()


def _parquet_shard(samples: list[tuple[dict[str, Any], bytes]]) -> bytes:
    columns: dict[str, list[Any]] = {name: [] for name in PARQUET_SCHEMA.names}
    for record, data in samples:
        columns["image"].append({"bytes": data, "path": f"{record['key']}.{sample_extension(data)}"})
        columns["sha256"].append(hashlib.sha256(data).hexdigest())
        for name in ("label", "class_name", "path", "score", *SCORE_COLUMNS):
            columns[name].append(record[name])
    table = pa.table(columns, schema=PARQUET_SCHEMA)
    total = sum(len(d) for _, d in samples)
    group = max(1, math.ceil(len(samples) * ROW_GROUP_BYTES / total)) if total else 1
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=group)
    return buffer.getvalue()


def write_shard(url: str, records: list[dict[str, Any]], fmt: str, data: DataConfig) -> ShardOutcome:
    """Read `records`' bytes and write them as one shard at `url`, in one atomic write. A record that reads
    as nothing, or as other bytes than the manifest's sha256, is skipped and returned (the driver warns and
    counts); a shard all of whose records were skipped is written empty, to keep the numbering contiguous."""
    samples: list[tuple[dict[str, Any], bytes]] = []
    skipped: list[tuple[str, str]] = []
    for record, blob in zip(records, _read(records, data), strict=True):
        if blob is None:
            skipped.append((record["path"], "deleted since curation"))
        elif record["sha256"] and hashlib.sha256(blob).hexdigest() != record["sha256"]:
            skipped.append((record["path"], "changed since curation (sha256 differs)"))
        else:
            samples.append((record, blob))
    body = _tar_shard(samples) if fmt == "webdataset" else _parquet_shard(samples)
    atomic_write_bytes(url, body, data.storage_options)
    return ShardOutcome(url, len(samples), len(body), skipped)


# ---------------------------------------------------------------------------------------------- the export


def export_kept(
    manifest: pd.DataFrame,
    folder: str,
    export: ExportConfig,
    data: DataConfig,
    max_in_flight: int | None = None,
) -> ExportResult:
    """Write `manifest`'s kept rows into `folder` as `export.format` shards, one Ray task per shard with at
    most `max_in_flight` running or queued (default: twice the cluster's CPUs); then `_export.json`, then the
    removal of stale shards of an earlier export into the same folder. `data` says how to read the sources
    (storage options, Parquet image column); the shards are written with the same storage options."""
    if export.format not in ("webdataset", "parquet"):
        raise ValueError(f"export.format is {export.format!r}: nothing to export")
    fmt, so = export.format, data.storage_options
    rows = kept_rows(manifest)
    per_shard = images_per_shard(rows, export, data) if len(rows) else 1
    starts = range(0, len(rows), per_shard)
    urls = [join(folder, shard_name(export.prefix, n, fmt)) for n in range(len(starts))]
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    limit = max_in_flight or max(2, int(2 * cluster_cpus()))
    outcomes: dict[str, ShardOutcome] = {}
    pending: list[ray.ObjectRef] = []
    for url, start in zip(urls, starts, strict=True):
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            outcomes.update((o.url, o) for o in ray.get(done))
        pending.append(task.remote(url, _records(rows.iloc[start : start + per_shard]), fmt, data))
    outcomes.update((o.url, o) for o in ray.get(pending))
    shards = [outcomes[u] for u in urls]
    skipped = [s for o in shards for s in o.skipped]
    result = ExportResult(
        format=fmt,
        folder=folder,
        shards=urls,
        pattern=brace_pattern(folder, export.prefix, len(urls), fmt),
        samples=sum(o.samples for o in shards),
        bytes=sum(o.bytes for o in shards),
        skipped=len(skipped),
        per_shard=per_shard,
    )
    index = {
        "format": fmt,
        "pattern": result.pattern,
        "shards": [posixpath.basename(u) for u in urls],
        "samples_per_shard": [o.samples for o in shards],
        "samples": result.samples,
        "bytes": result.bytes,
        "skipped": result.skipped,
        "skipped_examples": [{"path": p, "why": w} for p, w in skipped[:EXAMPLES]],
    }
    atomic_write_bytes(join(folder, INDEX_NAME), json.dumps(index, indent=1).encode(), so)
    removed = remove_stale(folder, export.prefix, {posixpath.basename(u) for u in urls}, so)
    for path, why in skipped[:EXAMPLES]:  # here, not in the tasks: the driver's log is the one a user reads
        log.warning("export: skipped %s: %s", path, why)
    if len(skipped) > EXAMPLES:
        log.warning(
            "export: skipped %d kept images in all (%d listed in %s)",
            len(skipped),
            EXAMPLES,
            result.index_url,
        )
    log.info(
        "exported %d images in %d %s shards (%.1f MiB) to %s%s",
        result.samples,
        len(urls),
        fmt,
        result.bytes / 2**20,
        result.pattern or folder,
        f"; removed {removed} stale shard(s)" if removed else "",
    )
    return result


def remove_stale(folder: str, prefix: str, keep: set[str], storage_options: dict[str, Any]) -> int:
    """Remove the `<prefix>-NNNNNN.tar|parquet` shards in `folder` that are not in `keep` (an earlier export
    with more shards, or in the other format); other names are left alone. Returns how many went."""
    fs, path = url_to_fs(folder, storage_options)
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return 0
    shard = re.compile(rf"^{re.escape(prefix)}-\d{{{SHARD_DIGITS},}}\.(tar|parquet)$")
    stale = sorted(n for n in names if shard.match(n) and n not in keep)
    for name in stale:
        fs.rm_file(posixpath.join(path, name))
    return len(stale)
