"""Decoded pixels held in Ray's object store as fixed chunks of consecutive rows, never as one array.

Scoring needs the decoded images several times over (K proxies, several epochs each, then a scoring pass).
Gathering them into one array on the driver made memory grow with the data (every proxy task also made its
own float copy of all of it) and tied every proxy to one process holding every pixel. Here the driver only
ever holds one decoded batch at a time: each is put into the object store as it arrives, then Ray tasks
re-cut them into chunks of `chunk_rows` consecutive rows in the manifest's order (sorted by path), so a
chunk's contents do not depend on the order in which Ray Data handed the batches back, and neither does any
score computed from them. Consumers fetch one chunk at a time (zero-copy on the chunk's node, a transfer
elsewhere; Ray spills chunks to disk when the store is full).

The same tasks compute each image's near-duplicate thumbnail (`stages.embed.thumbnails`), so the driver
gets those (256 floats per image) without a pass of its own over the pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd
import ray
import torch

from stages.base import ALL_TO_ALL, Batch, Stage
from stages.embed import thumbnails


@dataclass(frozen=True)
class PixelChunks:
    """N decoded images (S, S, 3) uint8 as consecutive chunks in the object store.

    Chunk c holds rows `starts[c]` to `starts[c + 1] − 1`. Picklable and small (one reference per chunk),
    so it travels to Ray tasks and actors, which fetch only the chunks they read.
    """

    refs: tuple[ray.ObjectRef, ...]
    starts: np.ndarray  # (C + 1,) int64 row offsets, starts[0] = 0, starts[-1] = N
    image_size: int

    @classmethod
    def from_array(cls, images: np.ndarray, chunk_rows: int = 512) -> PixelChunks:
        """Chunks of an array already in memory (tests, small callers)."""
        images = np.asarray(images, dtype=np.uint8)
        starts = np.arange(0, len(images), chunk_rows, dtype=np.int64)
        refs = tuple(ray.put(np.ascontiguousarray(images[s : s + chunk_rows])) for s in starts)
        return cls(refs, np.append(starts, len(images)), int(images.shape[1]) if images.ndim == 4 else 0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def chunk_count(self) -> int:
        return len(self.refs)

    def chunk_rows(self, c: int) -> np.ndarray:
        """The row indices chunk c holds."""
        return np.arange(self.starts[c], self.starts[c + 1], dtype=np.int64)

    def chunk(self, c: int) -> np.ndarray:
        """Chunk c's pixels: (n_c, S, S, 3) uint8, read-only (a view of shared memory on this node)."""
        return ray.get(self.refs[c])

    def chunk_of(self, rows: np.ndarray) -> np.ndarray:
        """The chunk holding each row."""
        return np.searchsorted(self.starts, np.asarray(rows, dtype=np.int64), side="right") - 1

    def iter_rows(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows of one chunk, their pixels) for the chunks that hold `rows`, one chunk fetched at a time,
        in chunk order; rows keep their given order within a chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        chunks = self.chunk_of(rows)
        for c in np.unique(chunks):
            mine = rows[chunks == c]
            yield mine, self.chunk(int(c))[mine - self.starts[c]]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The pixels of `rows`, in their order: (len(rows), S, S, 3). Holds all of them at once: for a
        batch, not for the whole set."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.image_size, self.image_size, 3), dtype=np.uint8)
        chunks = self.chunk_of(rows)
        for c in np.unique(chunks):
            where = np.flatnonzero(chunks == c)
            out[where] = self.chunk(int(c))[rows[where] - self.starts[c]]
        return out


@dataclass(frozen=True)
class ChunkWindows:
    """A proxy's view of the pixels (`pipeline.models.proxy.RowWindows`): windows of `chunks_per_window`
    chunks, the shuffle's unit. A window's rows are shuffled together, so it should span several classes'
    worth of rows; the demo's few thousand images are one window, a global shuffle."""

    pixels: PixelChunks
    chunks_per_window: int

    def __len__(self) -> int:
        return len(self.pixels)

    def windows(self, generator: torch.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        count = self.pixels.chunk_count
        order = torch.randperm(count, generator=generator).numpy() if generator is not None else range(count)
        order = np.asarray(order, dtype=np.int64)
        for w in range(0, count, self.chunks_per_window):
            group = [int(c) for c in order[w : w + self.chunks_per_window]]
            rows = np.concatenate([self.pixels.chunk_rows(c) for c in group])
            pixels = np.concatenate([self.pixels.chunk(c) for c in group])
            if generator is not None:
                perm = torch.randperm(len(rows), generator=generator).numpy()
                rows, pixels = rows[perm], pixels[perm]
            yield rows, pixels


@ray.remote(num_returns=2)
def _cut_chunk(picks: list[np.ndarray], *sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One chunk from the rows `picks[i]` of `sources[i]`, in that order; and its rows' thumbnails."""
    chunk = np.concatenate([src[p] for src, p in zip(sources, picks, strict=True)])
    return chunk, thumbnails(chunk)


class PixelStore(Stage):
    """All-to-all over the gathered rows, fed beforehand with the decoded batches as they stream past.

    `add` puts each streamed batch's good images into the object store as it arrives (the decode stage's
    `path`, `ok` and `image`), so the driver never holds more than one batch of pixels. Called on the
    gathered rows (every decodable row, sorted by path), it cuts what it stored into `PixelChunks` of
    `chunk_rows` rows in the rows' order and adds the columns `pixels` (those chunks) and `thumbnail` (each
    row's near-duplicate thumbnail, computed where the chunk is cut). Global because the chunks follow the
    order of every row.
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
        """`pixels` (PixelChunks, one row per path of `order`, which names every stored image once) and
        `thumbnail` (N, 256) float32 in `order`; the stored batches are released."""
        n = len(order)
        if n == 0:
            empty = PixelChunks((), np.zeros(1, dtype=np.int64), self.image_size)
            return {"pixels": empty, "thumbnail": np.zeros((0, 256), np.float32)}
        where = pd.DataFrame(
            {
                "source": np.concatenate([np.full(len(p), i) for i, p in enumerate(self.paths)]),
                "local": np.concatenate([np.arange(len(p)) for p in self.paths]),
            },
            index=pd.Index(np.concatenate(self.paths), name="path"),
        ).loc[list(order)]
        source, local = where["source"].to_numpy(), where["local"].to_numpy()
        starts = np.append(np.arange(0, n, self.chunk_rows, dtype=np.int64), n)
        refs, thumbs = [], []
        for s, e in pairwise(starts):
            picks, needed = _runs(source[s:e], local[s:e])
            chunk_ref, thumb_ref = _cut_chunk.remote(picks, *[self.refs[i] for i in needed])
            refs.append(chunk_ref)
            thumbs.append(thumb_ref)
        thumbnail = np.concatenate(ray.get(thumbs))
        self.refs, self.paths = [], []
        return {"pixels": PixelChunks(tuple(refs), starts, self.image_size), "thumbnail": thumbnail}


def _runs(source: np.ndarray, local: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """A chunk's rows as runs of consecutive rows from one batch: (rows taken from the batch, batch index)
    per run. Batches mostly arrive in listing order, so a chunk is usually one or two runs."""
    bounds = np.flatnonzero(np.diff(source)) + 1
    runs = np.split(np.arange(len(source)), bounds)
    return [local[r] for r in runs], [int(source[r[0]]) for r in runs]
