"""Score cache: per-image scores keyed by (sha256, scoring-config hash), beside the manifests.

A recurring curation over a bucket that grows should score only the new images, whatever its format: the
key is the image bytes' sha256, not the `path` (a file, a shard sample, a table row), so new shards or
tables beside old ones score only their new samples, and a copied or re-sharded image is still a hit.
Scores depend on the image bytes, its label and everything that shapes the proxies (model, epochs, seeds,
image size, classes...), so the cache is a folder per scoring key:

    <score.cache_url>/<key>/models.pt                 the K proxies' weights (+ k-means prototypes)
    <score.cache_url>/<key>/scores/<ns>.parquet      sha256, label, el2n, el2n_std, grand, forgetting, prototype

A run writes one new shard of rows (atomically, via `pipeline.core.storage.atomic_write_bytes`); a lookup reads
every shard and matches on sha256 and label (a relabelled image is a miss). Past `MAX_SHARDS` shards the
cache rewrites itself as one shard. New images are scored by the cached proxies, so old and new scores
come from the same models.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from pipeline.core.config import Config
from pipeline.core.storage import atomic_write_bytes, join, url_to_fs
from stages.manifest import write_parquet

log = logging.getLogger(__name__)

CACHE_COLUMNS = ("sha256", "label", "el2n", "el2n_std", "grand", "forgetting", "prototype")
MAX_SHARDS = 16

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
}


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

    def lookup(self, sha256: pd.Series | np.ndarray, labels: np.ndarray) -> pd.DataFrame:
        """Cached rows whose (sha256, label) match a query pair.

        The keys stay pandas' Arrow-backed `str`, never Python objects: at 10M rows objects cost gigabytes
        and minutes (measured: 26 s and 5 GB peak for a 10M-row merge on `str` keys).
        """
        cached = self.read_all()
        if cached.empty:
            return cached
        query = pd.DataFrame(
            {"sha256": pd.Series(np.asarray(sha256), dtype="str"), "label": np.asarray(labels)}
        )
        cached["sha256"] = cached["sha256"].astype("str")
        cached["label"] = cached["label"].astype(np.int64)
        query["label"] = query["label"].astype(np.int64)
        return cached.merge(query.drop_duplicates(), on=["sha256", "label"], how="inner")

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
