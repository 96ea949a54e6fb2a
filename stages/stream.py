"""Stream stage: a manifest's kept rows → a Ray Dataset of decoded training images, never materialised.

    manifest.parquet (kept rows) ─ split off a fixed validation set ─ per-epoch shuffled listing
      → stages.read.read_images (bytes)  → stages.decode.DecodeStage (RGB uint8)  → TrainingImages

Output columns of `training_dataset`: `image` (N×S×S×3 uint8, S = the model's input side) and `label`
(int64, −1 when unlabeled). Rows that no longer decode (an object changed since curation) are dropped.

The dataset covers `epochs` passes over the training images, each in its own seeded order, so one
`iter_torch_batches` pass trains for several epochs. The CPUs only read and decode: augmentation (random
resized crop, flip) runs on the training device in batch form (`pipeline.models.augment`), on the streamed
and the cached batches alike.

Small training sets are decoded once (`pretrain.cache_decoded_mib`): when the decoded images fit that budget
at the model's input size, they are read and decoded once into an array in Ray's object store
(`decode_cache`: in the calling process up to `DECODE_HERE_MAX` images, else one Ray Data pass), and each
Train worker then takes its batches from there (`cached_batches`) instead of reading storage every epoch:
the same epoch orders and images, from the same seed.

The validation set is `val_images` kept rows chosen by a seeded hash of their path (stable as the manifest
grows), excluded from training, decoded without augmentation.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
from PIL import Image

from pipeline.core.config import Config
from pipeline.core.errors import UserInputError
from stages.base import Batch, Stage
from stages.decode import BadImage, DecodeOptions, DecodeStage, decode_image
from stages.manifest import read_table
from stages.read import ImageListing, ReadBytes, read_images, read_parts

log = logging.getLogger(__name__)


def load_kept(manifest_url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The manifest's kept rows (path, label, class_name, ...), sorted by path."""
    frame, _ = read_table(manifest_url, storage_options)
    if "kept" in frame.columns:
        frame = frame[frame["kept"].fillna(False).astype(bool)]
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    if frame.empty:
        raise UserInputError(f"manifest {manifest_url} keeps no images: nothing to pretrain on")
    return frame


def split_validation(frame: pd.DataFrame, count: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val): `count` rows with the smallest seeded hash of their path go to val (at most half)."""
    count = min(count, len(frame) // 2)
    keys = np.array(
        [int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8], "big") for p in frame["path"]],
        dtype=np.uint64,
    )
    chosen = np.zeros(len(frame), dtype=bool)
    chosen[np.argsort(keys, kind="stable")[:count]] = True
    return frame[~chosen].reset_index(drop=True), frame[chosen].reset_index(drop=True)


def epoch_order(count: int, epochs: int, seed: int) -> np.ndarray:
    """Row indices for `epochs` passes over `count` rows, each pass in its own seeded permutation."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(count) for _ in range(epochs)])


def epoch_listing(frame: pd.DataFrame, epochs: int, seed: int) -> ImageListing:
    """`epochs` copies of the rows, each in its own seeded permutation, as one listing."""
    return listing_of(frame.iloc[epoch_order(len(frame), epochs, seed)])


def listing_of(rows: pd.DataFrame) -> ImageListing:
    """Manifest rows (path, optional label and class_name) as a listing, in their order; no label is -1."""
    labels = rows["label"].fillna(-1).astype(np.int64).tolist() if "label" in rows else [-1] * len(rows)
    names = rows["class_name"].fillna("").astype(str).tolist() if "class_name" in rows else [""] * len(rows)
    return ImageListing(
        root=str(rows["path"].iloc[0]),
        paths=rows["path"].astype(str).tolist(),
        labels=labels,
        class_names=names,
    )


class TrainingImages(Stage):
    """Map stage: keeps the rows that decoded and returns just the tensor columns `image` (at side `size`,
    resized only when the decoder gave another side) and `label`. Augmentation happens on the training
    device (`pipeline.models.augment`), not here."""

    name = "training-images"
    inputs = ("image", "ok", "label")
    outputs = ("image", "label")
    passthrough = False

    def __init__(self, size: int) -> None:
        self.size = size

    def process(self, batch: Batch) -> Batch:
        ok = np.asarray(batch["ok"], dtype=bool)
        images = np.asarray(batch["image"])[ok]
        labels = np.asarray(batch["label"], dtype=np.int64)[ok]
        if images.shape[1:3] != (self.size, self.size):
            images = np.stack(
                [
                    np.asarray(Image.fromarray(im).resize((self.size, self.size)), dtype=np.uint8)
                    for im in images
                ]
            ).reshape(len(images), self.size, self.size, 3)
        return {"image": images, "label": labels}


def image_size(config: Config) -> int:
    """The model's input side: pretrain.image_size, else decode.image_size."""
    return config.pretrain.image_size or config.decode.image_size


def epochs_needed(num_images: int, steps: int, global_batch: int) -> int:
    """Passes over `num_images` that cover `steps` batches of `global_batch` (+1 for dropped tails)."""
    return max(1, -(-steps * global_batch // max(num_images, 1)) + 1)


def training_dataset(frame: pd.DataFrame, config: Config, epochs: int, seed: int) -> ray.data.Dataset:
    """The lazy, streamed training dataset over `frame`'s rows for `epochs` passes (see module docs)."""
    listing = epoch_listing(frame, epochs, seed)
    data = config.data.model_copy(update={"input": listing.root})
    return read_images(
        listing,
        data,
        then=[DecodeStage(_decode_options(config), hash_bytes=False), TrainingImages(image_size(config))],
    )


def _decode_options(config: Config, size: int | None = None) -> DecodeOptions:
    """`decode` settings at side `size` (default: the model's input side)."""
    return DecodeOptions.from_config(
        config.decode.model_copy(update={"image_size": size or image_size(config)})
    )


# ------------------------------------------------------------------------------------------ decoded cache

# Up to this many images the cache is decoded in the calling process: a Ray Data pass costs seconds of
# start-up in a fresh process (each Tune trial builds its own cache), more than decoding them here.
DECODE_HERE_MAX = 4096
DECODE_HERE_CHUNK = 16  # objects each thread reads at once (one concurrent request batch on object stores)


@dataclass(frozen=True)
class DecodedCache:
    """Training images decoded once: `images` is an object-store ref to an (N, S, S, 3) uint8 array whose
    row i is the image of `frame` row i (columns path, label); rows that did not decode are left out."""

    images: ray.ObjectRef
    frame: pd.DataFrame


def fits_cache(count: int, config: Config) -> bool:
    """Whether `count` decoded images at the model's input size fit `pretrain.cache_decoded_mib`."""
    size = image_size(config)
    return 0 < count * size * size * 3 <= config.pretrain.cache_decoded_mib * 2**20


def decode_cache(frame: pd.DataFrame, config: Config) -> DecodedCache:
    """Read and decode `frame`'s images once (no augmentation) and put them in the object store: up to
    `DECODE_HERE_MAX` images in this process with I/O threads, more with Ray Data across the cluster. Images
    that no longer decode are left out with a warning, as the stream would drop them."""
    listing = listing_of(frame)
    if len(listing) <= DECODE_HERE_MAX:
        images, ok, reasons = decode_flagged(listing.paths, config)
    else:
        images, ok, reasons = _decode_with_ray_data(listing, config)
    if reasons:
        path, reason = next(iter(reasons.items()))
        counts = ", ".join(f"{r} {n}" for r, n in Counter(reasons.values()).most_common())
        log.warning(
            "%d training image(s) no longer decode and are left out (%s), e.g. %s (%s)",
            len(reasons),
            counts,
            path,
            reason,
        )
    kept = pd.DataFrame(
        {
            "path": np.asarray(listing.paths, dtype=object)[ok],
            "label": np.asarray(listing.labels, dtype=np.int64)[ok],
        }
    )
    if not ok.all():
        images = images[ok]  # the one copy, only when some were left out
    log.info(
        "decoded %d training images once (%.1f MiB in Ray's object store)", len(kept), images.nbytes / 2**20
    )
    return DecodedCache(images=ray.put(images), frame=kept)


def _decode_with_ray_data(
    listing: ImageListing, config: Config
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(images in listing order, decoded or not, {path: quarantine reason}) from one Ray Data pass."""
    data = config.data.model_copy(update={"input": listing.root})
    dataset = read_images(listing, data, then=[DecodeStage(_decode_options(config), hash_bytes=False)])
    size = image_size(config)
    index = {path: i for i, path in enumerate(listing.paths)}
    images = np.zeros((len(listing), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(listing), dtype=bool)
    reasons: dict[str, str] = {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for path, image, good, reason in zip(
            batch["path"], batch["image"], batch["ok"], batch["reason"], strict=True
        ):
            i = index[str(path)]
            images[i], ok[i] = image, bool(good)
            if not good:
                reasons[str(path)] = str(reason)
    return images, ok, reasons


def cached_batches(
    cache: DecodedCache,
    config: Config,
    epochs: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    start: int = 0,
    prepare: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None,
    prefetch: int = 2,
) -> Iterator[dict[str, Any]]:
    """Training worker `rank`'s batches (`pretrain.batch_size` rows: `image`, `label`) from the decoded cache:
    `epochs` passes in seeded orders, each global batch of batch_size × world rows split by rank (the tail
    that fills no global batch is dropped), not augmented (the trainer augments on its device). A thread
    gathers the next `prefetch` batches, and runs `prepare` on each (e.g. pin it and start its copy to the
    GPU), while the caller trains on this one. `start` skips that many global batches (counted round the
    sequence): a resumed run picks up mid-epoch where its checkpoint left off.

    The workers take the rows straight from the shared array: with nothing to read or decode, a Ray Data
    pipeline would only add its scheduler (which, held back by a slower trainer, spun a core until
    `pipeline.core.runtime.IdleWait`)."""
    images = ray.get(cache.images)  # on the same node: a read-only view of the shared array, no copy
    labels = cache.frame["label"].to_numpy(dtype=np.int64)
    order = epoch_order(len(cache.frame), epochs, seed)
    size, stride = config.pretrain.batch_size, config.pretrain.batch_size * world
    count = len(order) // stride

    def batch(k: int) -> dict[str, Any]:
        rows = order[k * stride + rank * size : k * stride + (rank + 1) * size]
        out = {"image": images[rows], "label": labels[rows]}  # decoded at the model's input side already
        return prepare(out) if prepare is not None else out

    first = start % count if count else 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = deque(pool.submit(batch, k) for k in range(first, min(first + max(prefetch, 1), count)))
        for k in range(first, count):
            ready = pending.popleft().result()
            if k + len(pending) + 1 < count:
                pending.append(pool.submit(batch, k + len(pending) + 1))
            yield ready


def load_images(paths: list[str], config: Config, size: int | None = None, threads: int = 8) -> np.ndarray:
    """Read and decode `paths` in this process with a few I/O threads (no Ray; for small sets such as the
    validation or evaluation images): (N, S, S, 3) uint8. A path that no longer decodes raises `BadImage`."""
    images, failed = decode_here(paths, config, size, threads)
    if failed:
        i, error = next(iter(failed.items()))
        raise BadImage(error.reason, f"{paths[i]}: {error}")
    return images


def decode_flagged(
    paths: list[str], config: Config, size: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """`decode_here` as `_decode_with_ray_data` answers: (images in path order, decoded or not,
    {path: quarantine reason})."""
    images, failed = decode_here(paths, config, size)
    ok = np.ones(len(paths), dtype=bool)
    ok[list(failed)] = False
    return images, ok, {paths[i]: e.reason for i, e in failed.items()}


def decode_here(
    paths: list[str], config: Config, size: int | None = None, threads: int = 8
) -> tuple[np.ndarray, dict[int, BadImage]]:
    """`load_images` that carries on past bad objects: (images, {index: BadImage}); failed rows stay zero.
    The objects are read as the stream reads them (`ReadBytes`: concurrent, retried, names taken literally,
    a deleted object `missing`), `chunk` at a time by each of `threads` threads, which then decode them: at
    most threads × chunk objects are held at once, and reading overlaps decoding."""
    size = size or image_size(config)
    options = _decode_options(config, size)
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    failed: dict[int, BadImage] = {}
    read = ReadBytes.for_data(config.data)

    def part(rows: np.ndarray) -> None:
        chunk = [paths[i] for i in rows]
        blobs = read({"path": np.asarray(chunk, dtype=object)})["bytes"]
        for i, blob in zip(rows, blobs, strict=True):
            try:
                out[i] = decode_image(blob, options)
            except BadImage as e:
                failed[i] = e

    # `chunk` objects per part, or every row of one shard / Parquet row group in one part (read once)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(part, read_parts(paths, config.data, DECODE_HERE_CHUNK)))
    return out, dict(sorted(failed.items()))
