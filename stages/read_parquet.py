"""Parquet image tables: a row per image, the image in `data.image_column`, the label in `data.label_column`.

The image column holds the raw bytes (binary) or the Hugging Face `datasets` Image struct
`{"bytes": binary, "path": string}`; a row with no bytes (null, or a struct that only names an external
file) is quarantined as `no-image`. The label column holds integers or class names (see
`stages.formats.label_of`); with `data.label_column: null` every row is unlabeled.

The driver reads each table's footer (`table_units`: columns checked, one read unit per row group); Ray Data
tasks then read one row group each (`ReadRowGroups`), only the two columns, so a table of any size streams.
A row's `path` is `<table URL>#<row>`, its 0-based index in the table. The training stream reads rows back
by row group (`RowGroupReader`), each row group once per pass.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import DataConfig
from pipeline.core.storage import url_to_fs
from stages.base import Batch, Stage
from stages.formats import (
    SAMPLE_COLUMNS,
    UNIT_COLUMNS,
    FormatError,
    LabelOptions,
    SampleFault,
    label_of,
    member_path,
    with_retries,
)
from stages.read_webdataset import rows_to_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableInfo:
    """A table's footer, as far as reading images goes."""

    url: str
    row_counts: tuple[int, ...]  # rows per row group
    columns: dict[str, pa.DataType]

    @property
    def starts(self) -> np.ndarray:
        """The row index each row group starts at (and the table's row count last)."""
        return np.concatenate([[0], np.cumsum(self.row_counts, dtype=np.int64)])


def table_info(url: str, storage_options: dict[str, Any], attempts: int = 4) -> TableInfo:
    def read() -> TableInfo:
        fs, path = url_to_fs(url, storage_options)
        with fs.open(path, "rb") as f:
            try:
                meta = pq.ParquetFile(f).metadata
            except pa.ArrowInvalid as e:
                raise FormatError(f"{url} is not a readable Parquet table: {e}") from None
            schema = meta.schema.to_arrow_schema()
            counts = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        return TableInfo(url, counts, {f.name: f.type for f in schema})

    return with_retries(read, f"footer of {url}", attempts)


def _is_image_type(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _is_image_type(kind.field(index).type)
    return False


def check_columns(info: TableInfo, data: DataConfig) -> None:
    """Fail (FormatError, naming the table and its columns) unless the table has the configured columns."""
    have = ", ".join(f"{n} ({t})" for n, t in info.columns.items())
    kind = info.columns.get(data.image_column)
    if kind is None:
        raise FormatError(
            f"table {info.url} has no image column {data.image_column!r} (data.image_column); it has: {have}"
        )
    if not _is_image_type(kind):
        raise FormatError(
            f"column {data.image_column!r} of {info.url} is {kind}: maskdiet reads image bytes (binary, or a "
            '{"bytes", "path"} struct), not paths or decoded pixels'
        )
    if data.label_column is not None and data.label_column not in info.columns:
        raise FormatError(
            f"table {info.url} has no label column {data.label_column!r} (data.label_column; "
            f"null for unlabeled rows); it has: {have}"
        )


def table_units(
    urls: list[str], data: DataConfig, threads: int = 16
) -> tuple[list[tuple[str, int, int]], int]:
    """(units, rows): one (table URL, row group, first row) per row group of every table, footers read
    with a few threads and every table's columns checked; rows is the total row count."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        infos = list(pool.map(lambda u: table_info(u, data.storage_options), urls))
    units: list[tuple[str, int, int]] = []
    for info in infos:
        check_columns(info, data)
        starts = info.starts
        units += [(info.url, g, int(starts[g])) for g, n in enumerate(info.row_counts) if n > 0]
    return units, sum(sum(i.row_counts) for i in infos)


def image_values(column: pa.Array | pa.ChunkedArray) -> tuple[list[bytes | None], list[str | None]]:
    """(bytes or None, the external path named instead or None) per row of an image column."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(array.type):
        valid = array.is_valid().to_pylist()
        blobs = array.field("bytes").to_pylist()
        names = (
            array.field("path").to_pylist()
            if array.type.get_field_index("path") >= 0
            else [None] * len(array)
        )
        return (
            [b if ok else None for b, ok in zip(blobs, valid, strict=True)],
            [n if ok else None for n, ok in zip(names, valid, strict=True)],
        )
    return array.to_pylist(), [None] * len(array)


def _read_group(url: str, group: int, columns: list[str], storage_options: dict[str, Any]) -> pa.Table:
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read_row_group(group, columns=columns)


# ------------------------------------------------------------------------------------------ curation rows


@dataclass(frozen=True)
class TableOptions:
    """What reading row groups for curation needs (picklable for Ray tasks)."""

    storage_options: dict[str, Any]
    image_column: str = "image"
    label_column: str | None = "label"
    labels: LabelOptions = field(default_factory=LabelOptions)
    attempts: int = 4

    @classmethod
    def from_config(cls, data: DataConfig) -> TableOptions:
        return cls(
            dict(data.storage_options), data.image_column, data.label_column, LabelOptions.from_config(data)
        )


def group_rows(url: str, group: int, first_row: int, options: TableOptions) -> list[dict]:
    """One row per table row of row group `group` (`SAMPLE_COLUMNS`), bad ones with their reason."""
    columns = [options.image_column] + ([options.label_column] if options.label_column else [])
    try:
        table = with_retries(
            lambda: _read_group(url, group, columns, options.storage_options), f"{url} row group {group}",
            options.attempts,
        )  # fmt: skip
    except FileNotFoundError:
        return [{"path": url, "label": -1, "class_name": "", "bytes": None, "read_reason": "missing",
                 "read_error": "the table was deleted since it was listed"}]  # fmt: skip
    blobs, names = image_values(table.column(options.image_column))
    labels = table.column(options.label_column).to_pylist() if options.label_column else [-1] * len(blobs)
    rows = []
    for i, (blob, name, value) in enumerate(zip(blobs, names, labels, strict=True)):
        row = {"path": member_path(url, first_row + i), "label": -1, "class_name": "", "bytes": blob,
               "read_reason": "", "read_error": ""}  # fmt: skip
        if blob is None:
            row["read_reason"] = "no-image"
            row["read_error"] = (
                f"column {options.image_column!r} only names {name!r}: external files are not read"
                if name
                else f"column {options.image_column!r} is null"
            )
        else:
            try:
                row["label"], row["class_name"] = label_of(
                    value, options.labels, f"column {options.label_column!r}"
                )
            except SampleFault as e:
                row["read_reason"], row["read_error"] = e.reason, str(e)
        rows.append(row)
    return rows


class ReadRowGroups(Stage):
    """Map stage: row groups (`stages.formats.UNIT_COLUMNS`: table URL, row group, its first row) → one row
    per table row (`SAMPLE_COLUMNS`): image bytes, label, class name, and a quarantine reason decided before
    decoding (`no-image`, `missing-label`, `bad-label`). Run one row group per call."""

    name = "read-row-groups"
    inputs = UNIT_COLUMNS
    outputs = SAMPLE_COLUMNS
    passthrough = False

    def __init__(self, options: TableOptions) -> None:
        self.options = options

    def process(self, batch: Batch) -> Batch:
        rows = [
            row
            for url, group, first in zip(batch["container"], batch["part"], batch["first_row"], strict=True)
            for row in group_rows(str(url), int(group), int(first), self.options)
        ]
        return rows_to_batch(rows)


# ------------------------------------------------------------------------------------------ training reads


class RowGroupReader:
    """Reads images back by row index for the training stream: one footer per table, each row group's image
    column once while it is the one being read (`read` keeps the last row group)."""

    def __init__(self, image_column: str, storage_options: dict[str, Any], attempts: int = 4) -> None:
        self.image_column, self.storage_options, self.attempts = image_column, storage_options, attempts
        self._starts: dict[str, np.ndarray] = {}
        self._last: tuple[tuple[str, int], list[bytes | None]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_starts": {}, "_last": None}  # a copy for another process starts empty

    def starts(self, url: str) -> np.ndarray:
        """The table's row-group starts (`TableInfo.starts`), its footer read once and its image column
        checked."""
        starts = self._starts.get(url)
        if starts is None:
            info = table_info(url, self.storage_options, self.attempts)
            kind = info.columns.get(self.image_column)
            if kind is None or not _is_image_type(kind):
                raise FormatError(
                    f"table {url} has no image column {self.image_column!r} (data.image_column; it has "
                    f"{', '.join(info.columns)}): pretrain needs the data settings of the curation"
                )
            starts = self._starts[url] = info.starts
        return starts

    def group_of(self, url: str, rows: list[int]) -> np.ndarray:
        """The row group of each row index (-1: past the table's end)."""
        starts = self.starts(url)
        rows_array = np.asarray(rows, dtype=np.int64)
        groups = np.searchsorted(starts, rows_array, side="right") - 1
        groups[(rows_array < 0) | (rows_array >= starts[-1])] = -1
        return groups

    def read(self, url: str, rows: list[int]) -> list[bytes | None]:
        """The image bytes of `rows` of the table at `url` (None: no such row, or no bytes)."""
        try:
            groups = self.group_of(url, rows)
        except FileNotFoundError:
            log.warning("%s: deleted since it was listed", url)
            return [None] * len(rows)
        starts = self._starts[url]
        out: list[bytes | None] = [None] * len(rows)
        for group in dict.fromkeys(g for g in groups.tolist() if g >= 0):  # in order: the last one is kept
            values = self._group(url, group)
            for i in np.flatnonzero(groups == group):
                out[i] = values[rows[i] - int(starts[group])]
        return out

    def _group(self, url: str, group: int) -> list[bytes | None]:
        last = self._last
        if last is not None and last[0] == (url, group):
            return last[1]
        table = with_retries(
            lambda: _read_group(url, group, [self.image_column], self.storage_options),
            f"{url} row group {group}",
            self.attempts,
        )
        values = image_values(table.column(self.image_column))[0]
        self._last = ((url, group), values)
        return values
