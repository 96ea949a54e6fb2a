"""Score cache: per-image scores keyed by (sha256, scoring-config hash), beside the manifests.

A recurring curation over a bucket that grows should score only the new images, whatever its format: the
key is the image bytes' sha256, not the `path` (a file, a shard sample, a table row), so new shards or
tables beside old ones score only their new samples, and a copied or re-sharded image is still a hit.
Scores depend on the image bytes, its label and everything that shapes the proxies (model, epochs, seeds,
image size, classes...), so the cache is a folder per scoring key:

    <score.cache_url>/<key>/models.pt                 the K proxies' weights (+ k-means prototypes)
    <score.cache_url>/<key>/scores/<ns>.parquet      sha256, label, el2n, el2n_std, grand, forgetting, prototype

A run writes one new shard of rows (atomically, via `pipeline.core.storage.atomic_write_bytes`); a lookup
reads every shard, a Parquet row group at a time, and matches on sha256 and label (a relabelled image is a
miss). Past `MAX_SHARDS` shards the cache rewrites itself as one shard. New images are scored by the cached proxies, so old and new scores
come from the same models.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.core.config import Config
from pipeline.core.storage import atomic_write_bytes, join, url_to_fs
from stages.manifest import write_parquet

log = logging.getLogger(__name__)

CACHE_COLUMNS = ("sha256", "label", "el2n", "el2n_std", "grand", "forgetting", "prototype")
SCORES = CACHE_COLUMNS[2:]  # what a lookup returns per query row
MAX_SHARDS = 16
# CACHE_COLUMNS' types as a lookup reads them. Shards written by different runs may differ (`string` or
# `large_string` keys, say), so every row group read is cast to these.
_SCHEMA = pa.schema(
    [("sha256", pa.large_string()), ("label", pa.int64())] + [(name, pa.float64()) for name in SCORES]
)

# Score settings that do not change any score value (where and how fast it runs) stay out of the key.
_NOT_IN_KEY = {
    "method",
    "cache",
    "cache_url",
    "cpus_per_model",
    "compute",
    "actors",
    "score_batch_size",
    "gpus_per_model",
    "num_clusters",
    "trainer",
    "max_failures",
}


@dataclass
class CacheHits:
    """What `ScoreCache.lookup` found, row for row with its query: `found[i]` says whether query row i is
    cached, and `scores[name][i]` is its cached value (NaN where not found, or where the cache holds NaN)."""

    found: np.ndarray  # (N,) bool
    scores: dict[str, np.ndarray]  # SCORES → (N,) float64

    @classmethod
    def none(cls, n: int) -> CacheHits:
        """N query rows, none found (also what a run without a cache gets)."""
        return cls(np.zeros(n, dtype=bool), {name: np.full(n, np.nan) for name in SCORES})

    def fill(self, query_rows: np.ndarray, cached: pa.Table) -> None:
        """Mark `query_rows` found, with the scores of `cached` (one row each, in the same order)."""
        self.found[query_rows] = True
        for name in SCORES:
            self.scores[name][query_rows] = cached[name].to_numpy()  # a null score becomes NaN


def _pair_keys(sha256: pa.Array, labels: np.ndarray) -> pa.Array:
    """One string per row for the pair (sha256, label), `<sha256>/<label>` (a label has no `/`)."""
    label = pc.cast(pa.array(labels), pa.large_string())
    return pc.binary_join_element_wise(sha256, label, pa.scalar("/", pa.large_string()))


def _latest_rows(keys: pa.Array, group_keys: pa.Array) -> np.ndarray:
    """For each key, the index of its last occurrence in `group_keys`, or −1. `index_in` finds a key's first
    occurrence, so the group's keys are searched backwards."""
    backwards = pc.fill_null(pc.index_in(keys, value_set=group_keys[::-1]), -1).to_numpy()
    return np.where(backwards >= 0, len(group_keys) - 1 - backwards.astype(np.int64), -1)


def _match(
    sha256: pa.Array, labels: np.ndarray, group_sha256: pa.Array, group_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(query positions, group positions) of the query rows whose pair (sha256, label) the group holds,
    each with that pair's latest row in the group.

    One hash pass on sha256 alone finds each query row's latest group row with the same bytes; when that
    row has the query's label, it is the answer (the common case, checked as integers). The rows whose bytes
    the group holds under another label (rare: one image under two labels) are matched again on the pair,
    among just those bytes' group rows.
    """
    rows = _latest_rows(sha256, group_sha256)
    candidates = np.flatnonzero(rows >= 0)
    rows = rows[candidates]
    same = group_labels[rows] == labels[candidates]
    matched, rows = candidates[same], rows[same]
    relabelled = candidates[~same]
    if len(relabelled):
        keys = sha256.take(relabelled)
        near = np.flatnonzero(pc.is_in(group_sha256, value_set=keys).to_numpy(zero_copy_only=False))
        pair_rows = _latest_rows(
            _pair_keys(keys, labels[relabelled]), _pair_keys(group_sha256.take(near), group_labels[near])
        )
        hit = pair_rows >= 0
        matched = np.concatenate([matched, relabelled[hit]])
        rows = np.concatenate([rows, near[pair_rows[hit]]])
    return matched, rows


# Keys are split into buckets by their first character (a sha256's first hex digit; any other character
# goes to the last bucket), so that the hash set `_match` builds holds a sixteenth of a row group, not all
# of it: at 1Mi rows of 64-character keys that set costs ~250 MB.
_HEX_DIGITS = pa.array(list("0123456789abcdef"), pa.large_string())
BUCKETS = len(_HEX_DIGITS) + 1
_BUCKET_SLICE = 1 << 20  # keys bucketed a slice at a time: no second copy of a 10M-row query


def _buckets(keys: pa.Array) -> np.ndarray:
    """Each key's bucket, 0..BUCKETS − 1 (nulls and empty keys: the last)."""
    out = np.empty(len(keys), dtype=np.int8)
    for start in range(0, len(keys), _BUCKET_SLICE):
        first = pc.utf8_lower(pc.utf8_slice_codeunits(keys.slice(start, _BUCKET_SLICE), 0, 1))
        digit = pc.fill_null(pc.index_in(first, value_set=_HEX_DIGITS), BUCKETS - 1)
        out[start : start + len(first)] = digit.to_numpy()
    return out


def _rows_by_bucket(buckets: np.ndarray) -> list[np.ndarray]:
    """The row indices of each bucket, ascending (int32: 4 bytes a query row, held through a lookup)."""
    return [np.flatnonzero(buckets == b).astype(np.int32) for b in range(BUCKETS)]


def scoring_key(config: Config, classes: list[str], task: str) -> str:
    """A short hash of everything that changes a score: the score and decode sections, classes, task."""
    score = {k: v for k, v in config.score.model_dump(mode="json").items() if k not in _NOT_IN_KEY}
    if task == "rotation":
        score["num_clusters"] = config.score.num_clusters
    decode = config.decode.model_dump(mode="json")
    payload = json.dumps({"score": score, "decode": decode, "classes": classes, "task": task}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ScoreCache:
    """Read and append the scores of one scoring key under `root` (any fsspec URL)."""

    def __init__(self, root: str, key: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = join(root, key)
        self.storage_options = storage_options or {}
        self.fs, self.path = url_to_fs(self.url, self.storage_options)

    def _shards(self) -> list[str]:
        folder = f"{self.path.rstrip('/')}/scores"
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith("."))

    def read_all(self) -> pd.DataFrame:
        """Every cached row (the latest per sha256 and label)."""
        frames = []
        for shard in self._shards():
            with self.fs.open(shard, "rb") as f:
                frames.append(pd.read_parquet(f))
        if not frames:
            return pd.DataFrame(columns=list(CACHE_COLUMNS))
        rows = pd.concat(frames, ignore_index=True)
        return rows.drop_duplicates(["sha256", "label"], keep="last").reset_index(drop=True)

    def lookup(self, sha256: pd.Series | np.ndarray, labels: np.ndarray) -> CacheHits:
        """Row i's cached scores, if the cache holds the pair (sha256[i], labels[i]): its latest row's.

        The result is aligned to the query and holds no keys, so a caller takes its hits and misses by a
        mask rather than merging on millions of strings (and no copy of the query's keys comes back).
        Memory stays small at 10M rows: the keys stay Arrow strings (never Python objects), and the cache
        is read one Parquet row group at a time, newest first, each matched by `_match` a bucket of keys at
        a time (`_buckets`: their first hex digit). A query row found
        in a newer group is not matched again in older ones, so it gets its pair's latest cached row, as
        `read_all` would; every query row is matched on its own, so a repeated pair is a hit every time.
        """
        keys = pc.cast(pa.array(sha256), pa.large_string())
        labels = np.asarray(labels, dtype=np.int64)
        hits = CacheHits.none(len(labels))
        query_buckets = _rows_by_bucket(_buckets(keys))
        for group in self._row_groups_newest_first():
            if hits.found.all():
                break
            group_sha256 = group["sha256"].combine_chunks()
            group_labels = group["label"].to_numpy()
            group_buckets = _rows_by_bucket(_buckets(group_sha256))
            scores = group.select(list(SCORES))
            for query_rows, group_rows in zip(query_buckets, group_buckets, strict=True):
                query_rows = query_rows[~hits.found[query_rows]]
                if len(query_rows) == 0 or len(group_rows) == 0:
                    continue
                matched, rows = _match(
                    keys.take(query_rows),
                    labels[query_rows],
                    group_sha256.take(group_rows),
                    group_labels[group_rows],
                )
                hits.fill(query_rows[matched], scores.take(group_rows[rows]))
            # before the next group is read: one group in memory at a time (the labels are a view of it),
            # and the allocator asked to hand the freed pages back (mimalloc keeps ~250 MB of them)
            del group, group_sha256, group_labels, scores
            pa.default_memory_pool().release_unused()
        return hits

    def _row_groups_newest_first(self) -> Iterator[pa.Table]:
        """The cached rows one Parquet row group at a time (our shards hold up to 1Mi rows per group), as
        `_SCHEMA`: shards in reverse write order, each one's groups from last to first."""
        for shard in reversed(self._shards()):
            with self.fs.open(shard, "rb") as f:
                groups = pq.ParquetFile(f).num_row_groups
            for index in reversed(range(groups)):
                yield self._read_group(shard, index)  # no local name: the caller's reference is the only one

    def _read_group(self, shard: str, index: int) -> pa.Table:
        """One row group of `shard`. The file is opened for this group alone: an open `ParquetFile` keeps
        the last group it read alive (127 MB at 1Mi rows), which would put two groups in memory while the
        next one is read."""
        columns = list(CACHE_COLUMNS)
        with self.fs.open(shard, "rb") as f:
            return pq.ParquetFile(f).read_row_group(index, columns=columns).select(columns).cast(_SCHEMA)

    def store(self, rows: pd.DataFrame, models: dict[str, Any] | None = None) -> None:
        """Append `rows` (CACHE_COLUMNS) as one new shard; save `models` when given."""
        if models is not None:
            self.save_models(models)
        if len(rows):
            self._write_shard(rows[list(CACHE_COLUMNS)].reset_index(drop=True))
        shards = self._shards()
        if len(shards) > MAX_SHARDS:
            merged = self.read_all()
            self._write_shard(merged)
            self.fs.rm(shards)
            log.info("score cache %s compacted %d shards into one", self.url, len(shards))

    def _write_shard(self, rows: pd.DataFrame) -> None:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"  # names sort in write order
        table = pa.Table.from_pandas(rows, preserve_index=False)  # as `to_parquet(index=False)` makes it
        write_parquet(join(self.url, "scores", name), table, self.storage_options, compression="snappy")

    def save_models(self, models: dict[str, Any]) -> None:
        """models: {"states": [state_dict, ...], "centroids": (k, D) array or None}."""
        payload = {
            "states": models["states"],
            "centroids": None if models.get("centroids") is None else torch.as_tensor(models["centroids"]),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(join(self.url, "models.pt"), buffer.getvalue(), self.storage_options)

    def load_models(self) -> dict[str, Any] | None:
        """The cached proxies, or None when this key has none yet."""
        path = f"{self.path.rstrip('/')}/models.pt"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        centroids = payload.get("centroids")
        return {
            "states": payload["states"],
            "centroids": None if centroids is None else centroids.numpy(),
        }
