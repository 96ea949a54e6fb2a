"""Manifest stage: the Parquet record of what was kept and why, written atomically to any fsspec URL.

`manifest.parquet` has one row per decodable input object (schema `MANIFEST_SCHEMA`), whatever the input
format: `path` names the image (a file's URL, a shard sample, a table row: `stages/formats.py`) and
`sha256` its bytes. Higher scores mean harder examples; a score column that was not computed is null.
`quarantine.parquet` has one row per object that could not be decoded. Key-value metadata holds the config
(secrets redacted), the maskdiet version and the run id. The file is serialised in memory, then written in
one atomic step (see `pipeline.core.storage.atomic_write_bytes`), so a reader never sees half a manifest.
`ManifestStage` is the writing as the last stage of a chain: it declares the columns a manifest needs.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.core.storage import atomic_local_file, atomic_write_bytes, is_local, url_to_fs
from stages.base import ALL_TO_ALL, Batch, Stage

MANIFEST_SCHEMA = pa.schema(
    [
        # a file's full URL; a shard sample <shard>.tar#<key>; a table row <table>.parquet#<row>
        ("path", pa.string()),
        ("sha256", pa.string()),  # of the image's bytes
        ("label", pa.int64()),  # -1 when unlabeled
        ("class_name", pa.string()),
        ("el2n", pa.float64()),  # mean over proxy models; higher = harder
        ("el2n_std", pa.float64()),  # std over proxy models
        ("grand", pa.float64()),  # gradient norm; higher = harder
        ("forgetting", pa.float64()),  # forgetting events during proxy training
        ("prototype", pa.float64()),  # distance to the nearest k-means prototype; higher = harder
        ("duplicate_group", pa.int64()),  # near-duplicate group id (null: not computed)
        ("score", pa.float64()),  # the score used to prune (null with --score none)
        ("kept", pa.bool_()),
        ("reason", pa.string()),  # kept | pruned:easy | pruned:hard | pruned:random | pruned:duplicate ...
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("reason", pa.string()),  # missing | empty | not-an-image | truncated | too-large | corrupt
        ("error", pa.string()),
    ]
)

# The columns no manifest row does without; the other MANIFEST_SCHEMA columns are null when not computed.
MANIFEST_INPUTS = ("path", "sha256", "label", "class_name", "score", "kept", "reason")

MANIFEST_NAME = "manifest.parquet"
QUARANTINE_NAME = "quarantine.parquet"


# Rows per Parquet row group, the size `pq.write_table` picks by default; the sorted file is written one
# group at a time, so only one group's rows are ever copied.
ROW_GROUP_ROWS = 1024 * 1024


def _table(
    frame: pd.DataFrame, schema: pa.Schema, metadata: dict[str, Any]
) -> tuple[pa.Table, pa.Array, pa.Schema]:
    """`frame`'s `schema` columns (missing ones null) as Arrow, the row order sorted by path, and `schema`
    with our metadata: what `write_parquet` writes.

    The columns keep the types pandas holds them in (Arrow-backed strings stay `large_string`, categories
    dictionaries) and are cast to `schema` one row group at a time as they are written: cast whole, a 10M-row
    manifest's strings would be copied at once (0.7 GB). Nor is the table reordered here: the writer takes
    the sorted rows a group at a time. Arrow's sort is stable, as `sort_values(kind="stable")` was.
    """
    present = [f.name for f in schema if f.name in frame.columns]
    given = pa.Table.from_pandas(frame[present], preserve_index=False)
    n = len(frame)
    columns = [given.column(f.name) if f.name in frame.columns else pa.nulls(n) for f in schema]
    meta = {
        b"maskdiet.version": __version__.encode(),
        b"maskdiet.written": dt.datetime.now(dt.UTC).isoformat().encode(),
    }
    for key, value in metadata.items():
        meta[f"maskdiet.{key}".encode()] = (value if isinstance(value, str) else json.dumps(value)).encode()
    table = pa.Table.from_arrays(columns, names=schema.names)
    order = pc.sort_indices(table, sort_keys=[("path", "ascending")])  # nulls last, as pandas put them
    return table, order, schema.with_metadata(meta)


def _write_rows(
    sink: Any, table: pa.Table, order: pa.Array | None, compression: str, schema: pa.Schema | None
) -> None:
    """`table`'s rows (in `order` when given) as `schema` (default: the table's), a row group at a time."""
    schema = schema or table.schema
    with pq.ParquetWriter(sink, schema, compression=compression) as writer:
        if len(table) == 0:
            writer.write_table(table.cast(schema))
        for start in range(0, len(table), ROW_GROUP_ROWS):
            rows = (
                table.slice(start, ROW_GROUP_ROWS)
                if order is None
                else table.take(order[start : start + ROW_GROUP_ROWS])
            )
            writer.write_table(rows if rows.schema == schema else rows.cast(schema))


def write_parquet(
    url: str,
    table: pa.Table,
    storage_options: dict[str, Any] | None = None,
    order: pa.Array | None = None,
    compression: str = "zstd",
    schema: pa.Schema | None = None,
) -> None:
    """Write `table` (its rows in `order` when given, cast to `schema` when given) to `url` so that a
    reader sees the old file or the whole new one.

    Local files are streamed into a temporary sibling, fsynced and renamed (what `atomic_write_bytes` does
    with a body in memory): a 10M-row manifest is about 0.8 GB of Parquet, which the driver need not hold.
    Object stores get the file serialised in memory and put in one request, which they make visible
    atomically.
    """
    fs, path = url_to_fs(url, storage_options)
    if not is_local(fs):
        buffer = io.BytesIO()
        _write_rows(buffer, table, order, compression, schema)
        atomic_write_bytes(url, buffer.getvalue(), storage_options)
        return
    with atomic_local_file(path) as f:
        _write_rows(f, table, order, compression, schema)


def write_manifest(
    url: str, frame: pd.DataFrame, metadata: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> None:
    """Write `frame` (columns of MANIFEST_SCHEMA; missing score columns become null) atomically to `url`."""
    table, order, schema = _table(frame, MANIFEST_SCHEMA, metadata)
    write_parquet(url, table, storage_options, order, schema=schema)


def write_quarantine(
    url: str, frame: pd.DataFrame, metadata: dict[str, Any], storage_options: dict[str, Any] | None = None
) -> None:
    table, order, schema = _table(frame, QUARANTINE_SCHEMA, metadata)
    write_parquet(url, table, storage_options, order, schema=schema)


def manifest_frame(batch: Batch) -> pd.DataFrame:
    """A batch's manifest columns as a frame, in MANIFEST_SCHEMA order; the columns it lacks stay out
    (`write_manifest` writes them as null) and so do the others (`image`)."""
    return pd.DataFrame({name: batch[name] for name in MANIFEST_SCHEMA.names if name in batch}, copy=False)


class ManifestStage(Stage):
    """All-to-all, the sink: every row's record → one Parquet file at `url`, written atomically. A manifest
    is written once, whole (a reader never sees half of one), so it waits for every row. Returns the batch
    as it came."""

    name = "manifest"
    kind = ALL_TO_ALL
    inputs = MANIFEST_INPUTS

    def __init__(
        self, url: str, metadata: dict[str, Any], storage_options: dict[str, Any] | None = None
    ) -> None:
        self.url, self.metadata, self.storage_options = url, metadata, storage_options

    def process(self, batch: Batch) -> Batch:
        write_manifest(self.url, manifest_frame(batch), self.metadata, self.storage_options)
        return batch


def read_table(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a manifest or quarantine file: (rows, metadata with JSON values decoded)."""
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    metadata: dict[str, Any] = {}
    for key, value in (table.schema.metadata or {}).items():
        name = key.decode()
        if not name.startswith("maskdiet."):
            continue
        text = value.decode()
        try:
            metadata[name.removeprefix("maskdiet.")] = json.loads(text)
        except json.JSONDecodeError:
            metadata[name.removeprefix("maskdiet.")] = text
    return table.to_pandas(), metadata


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    return read_table(url, storage_options)[0]
