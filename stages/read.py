"""Read stage: list the images under a URL and read their bytes with Ray Data.

Listing is recursive over `data.extensions` (case-insensitive); names or folders that start with `.` or `_`
are skipped (sidecars such as `_truth.parquet`). Labels come from the first folder under the root
(`root/<class>/.../<file>`, classes sorted, index = position) or from a labels table (csv/parquet with
columns `path`, `label` and optionally `class_name`; paths relative to the root or full URLs). Files
directly under the root, with no class folder, get label -1.

Output of `read_images` (a Ray Dataset): `LISTING_COLUMNS` — `path` (full URL), `label` (int64),
`class_name` — and `bytes` (the map stage `ReadBytes`), or what its `then` stages make of them. Bytes are read in the tasks that decode them (see `read_images`),
many objects per request round.

Shards and tables (`stages/formats.py`): `list_source` lists whatever `data.input` holds, in its format:
an `ImageListing` for a folder, a `ContainerListing` of read units (one shard, one Parquet row group) for
the others, which `read_containers` reads with `container_reader` (`stages/read_webdataset.py`,
`stages/read_parquet.py`). A listing of manifest rows may name shard samples and table rows
(`shard.tar#key`, `table.parquet#row`): `read_chain` then puts each container's rows (per pass over the
rows) in one block and `ReadBytes` reads each shard, or Parquet row group, once for all of them.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.data
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.config import DataConfig
from pipeline.core.errors import UserInputError
from pipeline.core.runtime import is_transient, retry_pause
from pipeline.core.storage import StorageError, check_readable, to_url, url_to_fs
from stages.base import Batch, ChainStages, Stage, check_chain, map_batches
from stages.formats import (
    PARQUET_SUFFIXES,
    TAR_SUFFIXES,
    UNIT_COLUMNS,
    ContainerListing,
    FormatError,
    Found,
    detect_format,
    find_inputs,
    is_hidden,
    is_tar,
    split_member,
)
from stages.read_parquet import ReadRowGroups, RowGroupReader, TableOptions, table_units
from stages.read_webdataset import ReadShards, ShardOptions, shard_images

log = logging.getLogger(__name__)

LISTING_COLUMNS = ("path", "label", "class_name")  # what a listing hands the first stage, per object


class LabelsError(UserInputError):
    """The labels table is unusable; the message names the problem rows."""


@dataclass(frozen=True)
class ImageListing:
    """What `list_images` found: one entry per object, in sorted path order."""

    root: str  # the input URL
    paths: list[str]  # full URLs
    labels: list[int]
    class_names: list[str]
    classes: list[str] = field(default_factory=list)  # sorted class names; label i is classes[i]

    def __len__(self) -> int:
        return len(self.paths)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "path": self.paths,
                "label": np.asarray(self.labels, dtype=np.int64),
                "class_name": self.class_names,
            }
        )

    def subset(self, keep: set[str]) -> ImageListing:
        """Only the paths in `keep` (e.g. the objects new since the last run)."""
        rows = [i for i, p in enumerate(self.paths) if p in keep]
        return ImageListing(
            root=self.root,
            paths=[self.paths[i] for i in rows],
            labels=[self.labels[i] for i in rows],
            class_names=[self.class_names[i] for i in rows],
            classes=self.classes,
        )


def _read_labels_table(url: str, storage_options: dict[str, Any]) -> pd.DataFrame:
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        raise LabelsError(f"labels table not found: {url}")
    kind = "Parquet" if path.endswith(".parquet") else "CSV"
    try:
        with fs.open(path, "rb") as f:
            table = pd.read_parquet(f) if kind == "Parquet" else pd.read_csv(f)
    except (ValueError, OSError, UnicodeDecodeError) as e:  # pandas/pyarrow parse errors are ValueErrors
        raise LabelsError(f"labels table {url} is not a readable {kind} file: {e}") from None
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise LabelsError(f"labels table {url} lacks column(s) {sorted(missing)}; it needs path,label")
    return table


def list_images(config: DataConfig) -> ImageListing:
    """List the image objects under `config.input` with their labels. Raises StorageError / LabelsError."""
    check_readable(config.input, config.storage_options)
    fs, root = url_to_fs(config.input, config.storage_options)
    root = root.rstrip("/")
    return _folder_listing(config, fs, root, fs.find(root))


def list_source(config: DataConfig) -> ImageListing | ContainerListing:
    """What `config.input` holds, in its format (`data.format`, or detected by `stages.formats.detect_format`
    from one listing): the images of a folder, or the read units of shards or tables. Raises StorageError,
    LabelsError or FormatError."""
    found = find_inputs(config)
    fmt = detect_format(config, found)
    if fmt == "folder":
        return _folder_listing(config, found.fs, found.root, found.files)
    if config.labels:
        raise FormatError(
            f"data.labels is for image folders; {fmt} input carries its labels "
            "(.cls or data.label_field for shards, data.label_column for tables)"
        )
    if fmt == "webdataset":
        return _list_shards(config, found)
    return _list_tables(config, found)


def _list_shards(config: DataConfig, found: Found) -> ContainerListing:
    shards = [found.url(p) for p in found.files if p.lower().endswith(TAR_SUFFIXES)]
    if not shards:
        raise StorageError(f"no .tar shards found at {config.input}")
    units = pd.DataFrame({"container": shards, "part": -1, "first_row": 0})
    classes = list(config.classes or [])
    return ContainerListing(config.input, "webdataset", units, len(shards), None, classes)


def _list_tables(config: DataConfig, found: Found) -> ContainerListing:
    tables = [found.url(p) for p in found.files if p.lower().endswith(PARQUET_SUFFIXES)]
    if not tables:
        raise StorageError(f"no .parquet tables found at {config.input}")
    units, rows = table_units(tables, config)
    frame = pd.DataFrame(units, columns=list(UNIT_COLUMNS))
    return ContainerListing(config.input, "parquet", frame, len(tables), rows, list(config.classes or []))


def container_reader(listing: ContainerListing, config: DataConfig) -> Stage:
    """The map stage that turns `listing`'s units into sample rows: `ReadShards` or `ReadRowGroups`."""
    if listing.format == "webdataset":
        return ReadShards(ShardOptions.from_config(config))
    return ReadRowGroups(TableOptions.from_config(config))


def _folder_listing(config: DataConfig, fs: Any, root: str, files: Sequence[str]) -> ImageListing:
    extensions = tuple(e.lower() for e in config.extensions)
    found = sorted(
        p for p in files if p.lower().endswith(extensions) and not is_hidden(posixpath.relpath(p, root))
    )
    if config.labels:
        return _listing_from_table(config, fs, root, found)
    relative = [posixpath.relpath(p, root) for p in found]
    folder = [r.split("/")[0] if "/" in r else "" for r in relative]
    classes = sorted({c for c in folder if c})
    index = {c: i for i, c in enumerate(classes)}
    return ImageListing(
        root=config.input,
        paths=[to_url(fs, p) for p in found],
        labels=[index.get(c, -1) for c in folder],
        class_names=folder,
        classes=classes,
    )


def _listing_from_table(config: DataConfig, fs: Any, root: str, found: list[str]) -> ImageListing:
    assert config.labels is not None
    table = _read_labels_table(config.labels, config.storage_options)
    present = {to_url(fs, p) for p in found}
    urls = []
    for p in table["path"].astype(str):
        if "://" in p or p.startswith("/"):
            urls.append(p)
        else:
            urls.append(to_url(fs, posixpath.join(root, p)))
    missing = [u for u in urls if u not in present]
    if missing:
        raise LabelsError(
            f"labels table {config.labels} references {len(missing)} file(s) not found under "
            f"{config.input}, e.g. {missing[0]}"
        )
    duplicated = pd.Series(urls)[pd.Series(urls).duplicated()]
    if len(duplicated):
        raise LabelsError(
            f"labels table {config.labels} lists {len(duplicated)} path(s) more than once, "
            f"e.g. {duplicated.iloc[0]}"
        )
    numeric = pd.to_numeric(table["label"], errors="coerce")
    bad = table["label"][numeric.isna() | (numeric % 1 != 0) | (numeric < -1)]
    if len(bad):
        raise LabelsError(
            f"labels table {config.labels}: column 'label' must hold integers ≥ -1 (-1: unlabeled), "
            f"got {bad.iloc[0]!r} in {len(bad)} row(s)"
        )
    labels = numeric.astype(np.int64).tolist()
    if "class_name" in table.columns:
        names = table["class_name"].astype(str).tolist()
        pairs = sorted({(label, name) for label, name in zip(labels, names, strict=True) if label >= 0})
        named: dict[int, list[str]] = {}
        for label, name in pairs:
            named.setdefault(label, []).append(name)
        clash = next(((label, n) for label, n in named.items() if len(n) > 1), None)
        if clash:
            raise LabelsError(
                f"labels table {config.labels}: label {clash[0]} has {len(clash[1])} class names "
                f"({', '.join(clash[1])}); give each label one name"
            )
        classes = [n[0] for _, n in sorted(named.items())]
    else:
        names = [str(x) for x in labels]
        classes = [str(x) for x in sorted(set(labels)) if x >= 0]  # -1: unlabeled, not a class
    order = np.argsort(urls, kind="stable")
    return ImageListing(
        root=config.input,
        paths=[urls[i] for i in order],
        labels=[labels[i] for i in order],
        class_names=[names[i] for i in order],
        classes=classes,
    )


class ReadBytes(Stage):
    """Map stage: adds `bytes`, the content of each row's `path` (a full URL), or None for an
    object deleted since it was listed (decode quarantines it as `missing`: one vanished file never ends a
    run).

    One call fetches a whole batch: `fs.cat_ranges`, which s3fs and gcsfs run as concurrent requests, so a
    batch of small objects costs about one round trip instead of one per object. (Not `fs.cat`: it expands
    `[`, `*` and `?` in a name as a pattern, and those are legal in object names.) Transient object-store
    errors (`pipeline.core.runtime.is_transient`) are retried with backoff, for the failed objects only.
    Local files are read directly: fsspec's local `cat` costs about twice as much per file (measured: 54
    against 30 µs for a 13 KB JPEG, a tenth of its decode).

    A path that names a shard sample or a table row (`x.tar#key`, `t.parquet#17`) is read from its
    container: a shard's images all at once (`shard_images`), a table's row group's image column
    (`RowGroupReader`, column `image_column`). The last container read is kept, so the batches of one block
    (`read_chain` gives each container's rows one block) read it once.
    """

    name = "read"
    inputs = ("path",)
    outputs = ("bytes",)

    def __init__(
        self, storage_options: dict[str, Any], attempts: int = 4, image_column: str = "image"
    ) -> None:
        self.storage_options = storage_options
        self.attempts = attempts
        self.image_column = image_column
        self._tables: RowGroupReader | None = None
        self._shard: tuple[str, dict[str, bytes]] | None = None  # the last shard read: URL, images by key

    @classmethod
    def for_data(cls, config: DataConfig) -> ReadBytes:
        return cls(config.storage_options, image_column=config.image_column)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": None, "_shard": None}  # a copy for another process starts empty

    def process(self, batch: Batch) -> Batch:
        urls = [str(p) for p in batch["path"]]
        members = [split_member(u) for u in urls]
        if any(members):
            found = [None] * len(urls)
            plain = [i for i, m in enumerate(members) if m is None]
            for i, data in zip(plain, self._read_objects([urls[i] for i in plain]), strict=True):
                found[i] = data
            for i, data in self._read_members(members):
                found[i] = data
            column = np.empty(len(urls), dtype=object)
            column[:] = found
            batch["bytes"] = column
            return batch
        batch["bytes"] = np.asarray(self._read_objects(urls), dtype=object)
        return batch

    def _read_objects(self, urls: list[str]) -> list[bytes | None]:
        if not urls:
            return []
        fs, _ = url_to_fs(urls[0], self.storage_options)  # fsspec caches the instance per worker
        raw = [fs._strip_protocol(u) for u in urls]
        if isinstance(fs, LocalFileSystem):
            return [_read_local(r) for r in raw]
        return self._read_remote(fs, raw)

    def _read_members(self, members: list[tuple[str, str] | None]) -> list[tuple[int, bytes | None]]:
        """(row, bytes) for the rows that name a container member, each container read once."""
        by_container: dict[str, list[int]] = {}
        for i, member in enumerate(members):
            if member is not None:
                by_container.setdefault(member[0], []).append(i)
        out: list[tuple[int, bytes | None]] = []
        for url, rows in by_container.items():
            keys = [members[i][1] for i in rows]  # type: ignore[index]
            if is_tar(url):
                images = self._shard_images(url)
                out += [(i, images.get(k)) for i, k in zip(rows, keys, strict=True)]
            else:
                if self._tables is None:
                    self._tables = RowGroupReader(self.image_column, self.storage_options, self.attempts)
                numbers = [int(k) if k.isdigit() else -1 for k in keys]
                out += list(zip(rows, self._tables.read(url, numbers), strict=True))
        return out

    def _shard_images(self, url: str) -> dict[str, bytes]:
        last = self._shard
        if last is not None and last[0] == url:
            return last[1]
        images = shard_images(url, self.storage_options, self.attempts)
        self._shard = (url, images)
        return images

    def _read_remote(self, fs: Any, raw: list[str]) -> list[bytes | None]:
        found: list[bytes | None] = [None] * len(raw)
        pending = list(range(len(raw)))
        for attempt in range(self.attempts):
            results = fs.cat_ranges([raw[i] for i in pending], None, None, on_error="return")
            failed: list[tuple[int, BaseException]] = []
            for i, value in zip(pending, results, strict=True):
                if isinstance(value, FileNotFoundError):
                    log.warning("%s: deleted since it was listed", raw[i])
                elif isinstance(value, BaseException):
                    failed.append((i, value))
                else:
                    found[i] = bytes(value)
            if not failed:
                break
            permanent = [e for _, e in failed if not is_transient(e)]
            if permanent:
                raise permanent[0]
            error = failed[0][1]
            if attempt + 1 == self.attempts:
                raise error
            log.warning(
                "retrying %d of %d objects after %s: %s", len(failed), len(raw), type(error).__name__, error
            )
            time.sleep(retry_pause(attempt))
            pending = [i for i, _ in failed]
        return found


def _read_local(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        log.warning("%s: deleted since it was listed", path)
        return None


def read_images(listing: ImageListing, config: DataConfig, then: Sequence[Stage] = ()) -> ray.data.Dataset:
    """A lazy Ray Dataset of the listed objects' bytes and labels (nothing is read until consumed), with
    the `then` map stages (decode, ...) applied to each batch right after its read, in the same call
    (`read_chain`).

    The listing (paths and labels only) is cut into blocks of `data.task_rows` rows on the driver; each
    block's objects are read by `ReadBytes`, `read_batch_size` at a time, in one Ray task, which Ray Data
    fuses with any `map_batches` stages that follow: bytes are read and decoded in one task without a trip
    through the object store, and without Ray's per-file metadata pass on the driver.

    Blocks of a few hundred rows amortise Ray's per-task cost (measured on 2,000 small JPEGs: 256-row tasks
    stream about 1.5× faster than 64-row ones). The blocks are Arrow tables handed over as they are
    (`from_blocks`): `from_pandas` would run one metadata task per block on the same workers first.
    """
    return read_chain(listing, config, ChainStages(ReadBytes.for_data(config), *then))


def read_chain(listing: ImageListing, config: DataConfig, chain: ChainStages) -> ray.data.Dataset:
    """`read_images` with the chain given whole: `ReadBytes` first, then the stages that take its bytes.
    The chain is checked against the listing's columns before anything runs."""
    check_chain([chain], LISTING_COLUMNS)
    if len(listing) == 0:
        raise StorageError(
            f"no images found under {config.input} (extensions: {', '.join(config.extensions)})"
        )
    frame, step = listing.frame(), config.task_rows
    groups = member_groups(listing.paths, config)
    if groups is None:
        blocks = [
            pa.Table.from_pandas(frame.iloc[i : i + step], preserve_index=False)
            for i in range(0, len(frame), step)
        ]
    else:
        blocks = [
            pa.Table.from_pandas(frame.iloc[rows], preserve_index=False)
            for rows in grouped_blocks(groups, listing.paths, step)
        ]
    dataset = map_batches(ray.data.from_blocks(blocks), chain, batch_size=config.read_batch_size)
    # All the work is one fused operator. On a small cluster Ray Data's per-operator reservation held it to
    # half the CPUs it may use (2 CPUs: a 2,000-JPEG training pass 1.4 s against 0.8 s without it); the size
    # profile set by `runtime.configure_data_context` turns the reservation off there.
    return dataset


def member_groups(paths: Sequence[str], config: DataConfig, threads: int = 16) -> list[str] | None:
    """The read group of each path: its shard, or its table and row group (footers read here, a few at
    once); a plain object is a group of its own. None when no path names a container member."""
    members = [split_member(p) for p in paths]
    if not any(members):
        return None
    groups = [f"\0{i}" for i in range(len(paths))]
    tables: dict[str, list[int]] = {}
    for i, member in enumerate(members):
        if member is not None and is_tar(member[0]):
            groups[i] = member[0]
        elif member is not None:
            tables.setdefault(member[0], []).append(i)
    if tables:
        reader = RowGroupReader(config.image_column, config.storage_options)

        def group_of(url: str) -> np.ndarray:
            keys = [members[i][1] for i in tables[url]]  # type: ignore[index]
            rows = [int(k) if k.isdigit() else -1 for k in keys]
            try:
                return reader.group_of(url, rows)
            except FileNotFoundError:  # deleted since curation: its rows read as missing, in one group
                return np.zeros(len(rows), dtype=np.int64)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for url, found in zip(tables, pool.map(group_of, tables), strict=True):
                for i, group in zip(tables[url], found.tolist(), strict=True):
                    groups[i] = f"{url}#{group}"
    return groups


def read_parts(paths: Sequence[str], config: DataConfig, chunk: int) -> list[np.ndarray]:
    """Row indices to read together: `chunk` consecutive objects, or for container members every row of one
    shard or Parquet row group (small groups packed up to `chunk` rows), so each is read once."""
    groups = member_groups(paths, config)
    if groups is None:
        return [np.arange(i, min(i + chunk, len(paths))) for i in range(0, len(paths), chunk)]
    return grouped_blocks(groups, paths, chunk)


def grouped_blocks(groups: Sequence[str], paths: Sequence[str], step: int) -> list[np.ndarray]:
    """Row indices of the blocks that read a listing grouped: the rows of one group (one shard, one row
    group) in one block, so it is read once per block. A listing that repeats paths (an epoch listing:
    pass k holds each path's k-th appearance) is grouped pass by pass, so each container is read once per
    pass; passes keep their order, groups their order of first appearance, rows their order within a group.
    Small groups share a block of up to `step` rows; a larger group is a block of its own."""
    n = len(paths)
    passes = pd.Series(list(paths)).groupby(list(paths), sort=False).cumcount().to_numpy()
    ids = (
        pd.DataFrame({"pass": passes, "group": list(groups)}).groupby(["pass", "group"], sort=False).ngroup()
    )
    ids = ids.to_numpy()
    order = np.lexsort((np.arange(n), ids, passes))
    runs = np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)
    blocks: list[np.ndarray] = []
    current: list[np.ndarray] = []
    size = 0
    for run in runs:
        if current and size + len(run) > step:
            blocks.append(np.concatenate(current))
            current, size = [], 0
        current.append(run)
        size += len(run)
    if current:
        blocks.append(np.concatenate(current))
    return blocks


def read_containers(listing: ContainerListing, config: DataConfig, chain: ChainStages) -> ray.data.Dataset:
    """A lazy Ray Dataset of every sample in `listing`'s shards or tables: the chain's first stage (a
    `container_reader`) reads one unit per task, the stages after it (decode, ...) run on its rows in
    batches of `read_batch_size`, fused by Ray Data into the same task. Checked against the units' columns
    before anything runs."""
    check_chain([chain], UNIT_COLUMNS)
    if len(listing) == 0:
        raise StorageError(f"nothing to read at {config.input}")
    reader, rest = chain.stages[0], chain.stages[1:]
    dataset = map_batches(ray.data.from_blocks(listing.blocks()), reader, batch_size=None)
    if rest:
        dataset = map_batches(dataset, ChainStages(*rest), batch_size=config.read_batch_size)
    return dataset
