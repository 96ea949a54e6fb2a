"""Decoded pixels held in Ray's object store as chunks of rows in a fixed shuffled order, never as one array.

Scoring needs the decoded images several times over (K proxies, several epochs each, then a scoring pass).
Gathering them into one array on the driver made memory grow with the data (every proxy task also made its
own float copy of all of it) and tied every proxy to one process holding every pixel. Here the driver only
ever holds one decoded batch at a time: each is put into the object store as it arrives, then Ray tasks
re-cut them into chunks of `chunk_rows` rows. Which rows share a chunk is a seeded permutation of the rows
(sorted by path), so a chunk's contents do not depend on the order in which Ray Data handed the batches
back, and neither does any score computed from them; and a chunk holds a mix of classes, where consecutive
paths would be one class folder, so a proxy that shuffles a few chunks at a time still sees every class.
Consumers fetch one chunk at a time (zero-copy on the chunk's node, a transfer elsewhere; Ray spills
chunks to disk when the store is full). The price of the mix: cutting a chunk reads rows from many decoded
batches, so on a multi-node cluster each node may pull up to one copy of the decoded batches while cutting.

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

LAYOUT_SEED = 0  # the permutation that deals rows into chunks; fixed, so reruns cut the same chunks


def chunk_layout(n: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Which rows each chunk holds: `members` (a seeded permutation of 0..n−1) and `starts` (C + 1,), chunk c
    holding rows members[starts[c]:starts[c + 1]]."""
    members = np.random.default_rng(LAYOUT_SEED).permutation(n).astype(np.int64)
    return members, np.append(np.arange(0, n, chunk_rows, dtype=np.int64), n)


@dataclass(frozen=True)
class PixelChunks:
    """N decoded images (S, S, 3) uint8 as chunks in the object store (see `chunk_layout`).

    Picklable and small (a reference per chunk; which rows each holds, and where each row is, are single
    object-store arrays), so it travels to Ray tasks and actors, which fetch only what they read.
    """

    refs: tuple[ray.ObjectRef, ...]
    starts: np.ndarray  # (C + 1,) int64: chunk c holds members[starts[c]:starts[c + 1]]
    members_ref: ray.ObjectRef  # (N,) int64 rows, chunk by chunk, in each chunk's order
    position_ref: ray.ObjectRef  # (N,) int64: row r is members[position[r]]
    image_size: int

    @classmethod
    def build(
        cls, refs: Sequence[ray.ObjectRef], members: np.ndarray, starts: np.ndarray, image_size: int
    ) -> PixelChunks:
        position = np.empty_like(members)
        position[members] = np.arange(len(members))
        return cls(tuple(refs), starts, ray.put(members), ray.put(position), image_size)

    @classmethod
    def from_array(cls, images: np.ndarray, chunk_rows: int = 512) -> PixelChunks:
        """Chunks of an array already in memory (tests, small callers), dealt as `chunk_layout` deals them."""
        images = np.asarray(images, dtype=np.uint8)
        members, starts = chunk_layout(len(images), chunk_rows)
        refs = [ray.put(np.ascontiguousarray(images[members[s:e]])) for s, e in pairwise(starts)]
        return cls.build(refs, members, starts, int(images.shape[1]) if images.ndim == 4 else 0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def chunk_count(self) -> int:
        return len(self.refs)

    def chunk_rows(self, c: int) -> np.ndarray:
        """The rows chunk c holds, in its order."""
        return ray.get(self.members_ref)[self.starts[c] : self.starts[c + 1]]

    def chunk(self, c: int) -> np.ndarray:
        """Chunk c's pixels: (n_c, S, S, 3) uint8, read-only (a view of shared memory on this node)."""
        return ray.get(self.refs[c])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chunk, index inside the chunk) of each row."""
        position = ray.get(self.position_ref)[np.asarray(rows, dtype=np.int64)]
        chunk = np.searchsorted(self.starts, position, side="right") - 1
        return chunk, position - self.starts[chunk]

    def iter_rows(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows of one chunk, their pixels) for the chunks that hold `rows`, one chunk fetched at a time,
        in chunk order; rows keep their given order within a chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        chunks, offsets = self.locate(rows)
        for c in np.unique(chunks):
            mine = chunks == c
            yield rows[mine], self.chunk(int(c))[offsets[mine]]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The pixels of `rows`, in their order: (len(rows), S, S, 3). Holds all of them at once: for a
        batch, not for the whole set."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.image_size, self.image_size, 3), dtype=np.uint8)
        chunks, offsets = self.locate(rows)
        for c in np.unique(chunks):
            where = np.flatnonzero(chunks == c)
            out[where] = self.chunk(int(c))[offsets[where]]
        return out

    def by_chunk(self, rows: np.ndarray) -> np.ndarray:
        """`rows` reordered chunk by chunk (a block of them then touches few chunks)."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows[np.argsort(ray.get(self.position_ref)[rows], kind="stable")]


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
            group = [int(c) for c in order[w : w + self.chunks_per_window]]
            rows = np.concatenate([self.pixels.chunk_rows(c) for c in group])
            pixels = np.concatenate([self.pixels.chunk(c) for c in group])
            if generator is not None:
                perm = torch.randperm(len(rows), generator=generator).numpy()
                rows, pixels = rows[perm], pixels[perm]
            yield rows, pixels


@ray.remote(num_returns=2)
def _cut_chunk(
    picks: list[np.ndarray], restore: np.ndarray, *sources: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One chunk: the rows `picks[i]` of `sources[i]`, concatenated, then put in the chunk's order by
    `restore`; and its rows' thumbnails."""
    chunk = np.concatenate([src[p] for src, p in zip(sources, picks, strict=True)])[restore]
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
            return {
                "pixels": PixelChunks.from_array(
                    np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
                ),
                "thumbnail": np.zeros((0, 256), np.float32),
            }
        where = pd.DataFrame(
            {
                "source": np.concatenate([np.full(len(p), i) for i, p in enumerate(self.paths)]),
                "local": np.concatenate([np.arange(len(p)) for p in self.paths]),
            },
            index=pd.Index(np.concatenate(self.paths), name="path"),
        ).loc[list(order)]
        source, local = where["source"].to_numpy(), where["local"].to_numpy()
        members, starts = chunk_layout(n, self.chunk_rows)
        refs, thumbs = [], []
        for s, e in pairwise(starts):
            rows = members[s:e]
            needed, picks, restore = _picks(source[rows], local[rows])
            chunk_ref, thumb_ref = _cut_chunk.remote(picks, restore, *[self.refs[i] for i in needed])
            refs.append(chunk_ref)
            thumbs.append(thumb_ref)
        thumbnail = np.empty((n, 256), np.float32)
        thumbnail[members] = np.concatenate(ray.get(thumbs))  # chunk order → row order
        self.refs, self.paths = [], []
        return {"pixels": PixelChunks.build(refs, members, starts, self.image_size), "thumbnail": thumbnail}


def _picks(source: np.ndarray, local: np.ndarray) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """A chunk's rows grouped by the batch holding them: the batches, the rows taken from each, and the
    permutation that puts the concatenated pieces back in the chunk's order."""
    by_source = np.argsort(source, kind="stable")
    needed, first = np.unique(source[by_source], return_index=True)
    picks = np.split(local[by_source], first[1:])
    restore = np.empty_like(by_source)
    restore[by_source] = np.arange(len(by_source))
    return needed.tolist(), picks, restore
