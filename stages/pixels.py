"""Decoded pixels held once in Ray's object store, read a few thousand rows at a time, never as one array.

Scoring needs the decoded images several times over (K proxies, several epochs each, then a scoring pass).
Gathering them into one array on the driver made memory grow with the data (every proxy task also made its
own float copy of all of it) and tied every proxy to one process holding every pixel. Here the driver only
ever holds one decoded batch at a time: each is put into the object store as it arrives (a *source*), and
that one copy is all there is. What readers see is a layout over it: rows (sorted by path) dealt into
*chunks* of `chunk_rows` by a fixed permutation, so

- a chunk's rows do not depend on the order in which Ray Data handed the batches back, and neither does any
  score computed from them (reruns deal the same chunks);
- a chunk mixes the classes, where consecutive paths would be one class folder, so a proxy that shuffles a
  window of a few chunks at a time still sees every class.

A reader gathers a window's rows from the sources that hold them (zero-copy views on the sources' node;
a transfer of each source to another node once, where Ray caches it; spilled to disk when the store is
full), so only the window is ever copied.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray
import torch

from stages.base import ALL_TO_ALL, Batch, Stage
from stages.embed import THUMBNAIL_WIDTH, thumbnails

LAYOUT_SEED = 0  # the permutation that deals rows into chunks; fixed, so reruns deal the same chunks


def gather(
    sources: Sequence[ray.ObjectRef],
    where_ref: ray.ObjectRef,
    rows: np.ndarray,
    shape: tuple[int, ...],
    dtype: np.dtype,
) -> np.ndarray:
    """Rows of arrays kept in the object store as `sources`, row r being sources[where[r, 0]][where[r, 1]]:
    (len(rows), *shape) in the order of `rows`, read source by source."""
    rows = np.asarray(rows, dtype=np.int64)
    where = ray.get(where_ref)[rows]
    out = np.empty((len(rows), *shape), dtype=dtype)
    for s in np.unique(where[:, 0]):
        mine = np.flatnonzero(where[:, 0] == s)
        out[mine] = ray.get(sources[int(s)])[where[mine, 1]]
    return out


def put_in_pieces(array: np.ndarray, piece_rows: int) -> tuple[list[ray.ObjectRef], np.ndarray]:
    """`array` (N, ...) put in the object store in pieces of `piece_rows` rows: the pieces, and where each
    row went, (N, 2) int64 = (piece, index in it), as `gather` reads it."""
    n = len(array)
    pieces = [ray.put(np.ascontiguousarray(array[s : s + piece_rows])) for s in range(0, n, piece_rows)]
    rows = np.arange(n, dtype=np.int64)
    return pieces, np.stack([rows // piece_rows, rows % piece_rows], axis=1).reshape(n, 2)


def chunk_layout(n: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Which rows each chunk holds: `members` (a seeded permutation of 0..n−1) and `starts` (C + 1,), chunk c
    holding rows members[starts[c]:starts[c + 1]]."""
    members = np.random.default_rng(LAYOUT_SEED).permutation(n).astype(np.int64)
    return members, np.append(np.arange(0, n, chunk_rows, dtype=np.int64), n)


@dataclass(frozen=True)
class PixelChunks:
    """N decoded images (S, S, 3) uint8 in the object store, as `sources` (whatever batches they were put
    in) read through the chunk layout of `chunk_layout`.

    Picklable and small (a reference per source; the per-row arrays are single object-store arrays), so it
    travels to Ray tasks and actors, which fetch only the sources holding the rows they read.
    """

    sources: tuple[ray.ObjectRef, ...]  # each (n_b, S, S, 3) uint8
    where_ref: ray.ObjectRef  # (N, 2) int64: row r is sources[where[r, 0]][where[r, 1]]
    members_ref: ray.ObjectRef  # (N,) int64: the rows chunk by chunk (see `chunk_layout`)
    starts: np.ndarray  # (C + 1,) int64
    image_size: int

    @classmethod
    def build(
        cls, sources: Sequence[ray.ObjectRef], where: np.ndarray, chunk_rows: int, image_size: int
    ) -> PixelChunks:
        """The layout over `sources`, row r found at `where[r]` = (source, index in it)."""
        members, starts = chunk_layout(len(where), chunk_rows)
        return cls(tuple(sources), ray.put(np.asarray(where, np.int64)), ray.put(members), starts, image_size)

    @classmethod
    def from_array(cls, images: np.ndarray, chunk_rows: int = 512) -> PixelChunks:
        """An array already in memory (tests, small callers), put in pieces of `chunk_rows` rows."""
        images = np.asarray(images, dtype=np.uint8)
        sources, where = put_in_pieces(images, chunk_rows)
        size = int(images.shape[1]) if images.ndim == 4 else 0
        return cls.build(sources, where, chunk_rows, size)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def chunk_count(self) -> int:
        return len(self.starts) - 1

    def chunk_rows(self, c: int) -> np.ndarray:
        """The rows chunk c holds, in its order."""
        return ray.get(self.members_ref)[self.starts[c] : self.starts[c + 1]]

    def source_of(self, rows: np.ndarray) -> np.ndarray:
        """The source holding each row."""
        return ray.get(self.where_ref)[np.asarray(rows, dtype=np.int64), 0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The pixels of `rows`, in their order: (len(rows), S, S, 3), gathered source by source. Holds all
        of them at once: for a batch or a window, not for the whole set."""
        shape = (self.image_size, self.image_size, 3)
        return gather(self.sources, self.where_ref, rows, shape, np.dtype(np.uint8))

    def iter_rows(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows held by one source, their pixels) for the sources that hold `rows`, one source read at a
        time; rows keep their given order within a piece."""
        rows = np.asarray(rows, dtype=np.int64)
        sources = self.source_of(rows)
        for s in np.unique(sources):
            mine = rows[sources == s]
            yield mine, self.take(mine)

    def by_source(self, rows: np.ndarray) -> np.ndarray:
        """`rows` reordered source by source (a block of them then reads few sources)."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows[np.argsort(self.source_of(rows), kind="stable")]


@dataclass(frozen=True)
class StoredRows:
    """N rows of width `width` (float32) kept in the object store as the pieces they were computed in,
    read a range at a time: each image's near-duplicate thumbnail, computed beside its stored batch of
    pixels. Gathered on the driver they would cost 1 KB an image (1 GB per million), the largest thing it
    held; the duplicate search reads them a tile at a time instead (`stages.embed.thumbnail_groups`)."""

    sources: tuple[ray.ObjectRef, ...]  # each (n_b, width) float32
    where_ref: ray.ObjectRef  # (N, 2) int64, as `PixelChunks.where_ref`
    count: int
    width: int

    @classmethod
    def from_array(cls, rows: np.ndarray, piece_rows: int = 4096) -> StoredRows:
        """An array already in memory (tests, small callers), put in pieces of `piece_rows` rows."""
        rows = np.asarray(rows, dtype=np.float32)
        sources, where = put_in_pieces(rows, piece_rows)
        return cls(tuple(sources), ray.put(where), len(rows), int(rows.shape[1]))

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return self.count, self.width

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), width) float32, in the order of `rows`."""
        return gather(self.sources, self.where_ref, rows, (self.width,), np.dtype(np.float32))

    def to_numpy(self) -> np.ndarray:
        """Every row at once (tests and small sets)."""
        return self.take(np.arange(self.count))


@dataclass(frozen=True)
class ChunkWindows:
    """A proxy's view of the pixels (`pipeline.models.proxy.RowWindows`): windows of `chunks_per_window`
    chunks, the shuffle's unit: the windows come in a random order and each one's rows are shuffled
    together (every chunk already mixes the classes, see `chunk_layout`). The demo's few thousand images
    are one window, a global shuffle."""

    pixels: PixelChunks
    chunks_per_window: int

    def __len__(self) -> int:
        return len(self.pixels)

    def windows(self, generator: torch.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        count = self.pixels.chunk_count
        order = torch.randperm(count, generator=generator).numpy() if generator is not None else range(count)
        order = np.asarray(order, dtype=np.int64)
        for w in range(0, count, self.chunks_per_window):
            rows = np.concatenate(
                [self.pixels.chunk_rows(int(c)) for c in order[w : w + self.chunks_per_window]]
            )
            if generator is not None:
                rows = rows[torch.randperm(len(rows), generator=generator).numpy()]
            yield rows, self.pixels.take(rows)  # the window's one copy


@ray.remote
def _thumbnails(images: np.ndarray) -> np.ndarray:
    return thumbnails(images)


class PixelStore(Stage):
    """All-to-all over the gathered rows, fed beforehand with the decoded batches as they stream past.

    `add` puts each streamed batch's good images into the object store as it arrives (the decode stage's
    `path`, `ok` and `image`), so the driver never holds more than one batch of pixels. Called on the
    gathered rows (every decodable row, sorted by path), it lays what it stored out as `PixelChunks` in the
    rows' order and adds the columns `pixels` (those) and `thumbnail` (each row's near-duplicate thumbnail,
    computed by a Ray task per stored batch and left in the object store: `StoredRows`). Global because the
    layout follows the order of every row.
    """

    name = "store-pixels"
    kind = ALL_TO_ALL
    inputs = ("path",)
    outputs = ("pixels", "thumbnail")

    def __init__(self, image_size: int, chunk_rows: int) -> None:
        self.image_size, self.chunk_rows = image_size, chunk_rows
        self.refs: list[ray.ObjectRef] = []
        self.paths: list[np.ndarray] = []

    def add(self, batch: Batch) -> None:
        """Store one decoded batch's good images (those with `ok`)."""
        ok = np.asarray(batch["ok"], dtype=bool)
        if ok.any():
            self.refs.append(ray.put(np.ascontiguousarray(np.asarray(batch["image"])[ok])))
            self.paths.append(np.asarray(batch["path"])[ok])

    def process(self, batch: Batch) -> Batch:
        return {**batch, **self.finish(np.asarray(batch["path"]).tolist())}

    def finish(self, order: Sequence[str]) -> Batch:
        """`pixels` (PixelChunks, one row per path of `order`, which names stored images once each) and
        `thumbnail` (StoredRows, (N, 256) float32 in `order`). The store is then empty (the pixels live on in
        `pixels`)."""
        refs, paths, self.refs, self.paths = self.refs, self.paths, [], []
        if not len(order):
            empty = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
            no_rows = StoredRows.from_array(np.zeros((0, THUMBNAIL_WIDTH), np.float32))
            return {"pixels": PixelChunks.from_array(empty), "thumbnail": no_rows}
        found = pd.DataFrame(
            {
                "source": np.concatenate([np.full(len(p), i) for i, p in enumerate(paths)]),
                "local": np.concatenate([np.arange(len(p)) for p in paths]),
            },
            index=pd.Index(np.concatenate(paths), name="path"),
        ).loc[list(order)]
        where = found[["source", "local"]].to_numpy(dtype=np.int64)
        pixels = PixelChunks.build(refs, where, self.chunk_rows, self.image_size)
        pieces = [_thumbnails.remote(ref) for ref in refs]  # one per stored batch, row for row with it
        ray.wait(pieces, num_returns=len(pieces), fetch_local=False)  # computed now, not at the first read
        thumbnail = StoredRows(tuple(pieces), pixels.where_ref, len(where), THUMBNAIL_WIDTH)
        return {"pixels": pixels, "thumbnail": thumbnail}
