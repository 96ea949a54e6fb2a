"""Label-free scores: distance to the nearest k-means prototype, and near-duplicate groups.

Prototype difficulty (Sorscher et al. 2022, "Beyond neural scaling laws"): embed every image with an
encoder trained without labels, cluster with k-means, and call an image hard when it lies far from its
nearest prototype (centroid); easy images sit in the middle of a dense cluster. The encoder is a proxy
CNN trained to predict image rotations (`stages/score.py`, task `rotation`), or a maskdiet MAE
`encoder.pth` given as `score.encoder`. Higher `prototype` = harder.

Near-duplicates are found on pixels, not on learned features: a classifier's features put every image of a
class close together, so a cosine threshold there would merge distinct images. Each image becomes a
16×16 grey thumbnail with its mean removed (so brightness and contrast shifts, re-encoding and small
resizes do not matter) and images with cosine similarity ≥ `score.duplicate_threshold` share a group
(transitively). The comparison is all-pairs in square tiles: O(N²) time, O(block²) memory.

Both are global, so they run as all-to-all stages: `DuplicateGroups` here, and the prototype distance inside
`stages.score.ScoreStage` (its k-means prototypes are cached with the proxies, so it lives with them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import ray
import torch
import torch.nn.functional as F

from stages.base import ALL_TO_ALL, Batch, Stage

log = logging.getLogger(__name__)

T = TypeVar("T")


def prototype_scores(
    embedding: np.ndarray,
    num_clusters: int,
    seed: int = 0,
    centroids: np.ndarray | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each embedding (N, D) to its nearest centroid: (N,), and the centroids (k, D).

    With `centroids` given (from an earlier run, kept in the score cache) no clustering is done, so new
    images are measured against the same prototypes as the old ones. Runs in torch on `device` (a GPU with
    `score.use_gpu`), in float64 on the CPU and float32 on a GPU.
    """
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = torch.as_tensor(np.asarray(embedding), dtype=dtype, device=device)
    if centroids is None:
        c = kmeans(x, max(1, min(num_clusters, len(x))), seed)
    else:
        c = torch.as_tensor(np.asarray(centroids), dtype=dtype, device=device)
    d2, _ = nearest(x, c)
    return d2.clamp_min(0).sqrt().double().cpu().numpy(), c.double().cpu().numpy()


def nearest(x: torch.Tensor, c: torch.Tensor, block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance of each row of x (N, D) to its nearest row of c (k, D), and that row's index;
    `block` rows at a time, so memory is O(block·k), not O(N·k)."""
    c_sq = (c**2).sum(1)
    best, index = [], []
    for start in range(0, len(x), block):
        xb = x[start : start + block]
        d2 = (xb**2).sum(1, keepdim=True) - 2 * xb @ c.T + c_sq  # (b, k)
        value, arg = d2.min(1)
        best.append(value)
        index.append(arg)
    if not best:
        return x.new_zeros(0), torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat(best), torch.cat(index)


def kmeans(x: torch.Tensor, k: int, seed: int, restarts: int = 4, iterations: int = 100) -> torch.Tensor:
    """k-means (k-means++ seeding, Lloyd's iterations) on x (N, D) where x lives, the best of `restarts`
    by inertia: the centroids (k, D). Batched distances only (`nearest`), so a GPU clusters millions of
    embeddings, where scikit-learn's would run on the driver's CPU."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = x[:k], float("inf")
    for _ in range(restarts):
        c = _kmeans_pp(x, k, generator)
        for _ in range(iterations):
            _, assign = nearest(x, c)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)
            moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)  # empty: stays
            shift = float((moved - c).pow(2).sum())
            c = moved
            if shift <= 1e-10 * float(c.pow(2).sum().clamp_min(1e-12)):
                break
        inertia = float(nearest(x, c)[0].clamp_min(0).sum())
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability ∝ squared distance to the nearest so far."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        weights = d2.clamp_min(0).double().cpu()
        pick = (
            int(torch.multinomial(weights, 1, generator=generator))
            if float(weights.sum()) > 0
            else int(torch.randint(len(x), (1,), generator=generator))
        )
        centres.append(x[pick])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    return torch.stack(centres)


THUMBNAIL_SIDE = 16
THUMBNAIL_WIDTH = THUMBNAIL_SIDE**2


class Rows(Protocol):
    """Rows read by index where they are kept (`stages.pixels.StoredRows`: in the object store)."""

    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...


def thumbnails(images: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """(N, S, S, 3) uint8 → (N, side²) float32: grey, area-downsampled, mean removed, unit L2 norm."""
    x = torch.from_numpy(np.asarray(images).astype(np.float32)).mean(-1)[:, None]  # (N, 1, S, S)
    x = F.adaptive_avg_pool2d(x, side).reshape(len(images), -1)  # (N, side²)
    x = x - x.mean(1, keepdim=True)
    return F.normalize(x, dim=1).numpy()


def near_duplicate_groups(images: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """Group id per image (N,) int64: the smallest row index in its near-duplicate group (its own index
    when it has no near-duplicate). Flat images (no contrast) are never grouped."""
    return thumbnail_groups(
        thumbnails(images) if len(images) else np.zeros((0, THUMBNAIL_WIDTH), np.float32), threshold, block
    )


def _tile(thumbs: np.ndarray | Rows, start: int, stop: int, device: str) -> torch.Tensor:
    """Rows start..stop − 1 of `thumbs` as a float32 tensor on `device`."""
    stop = min(stop, len(thumbs))
    rows = thumbs[start:stop] if isinstance(thumbs, np.ndarray) else thumbs.take(np.arange(start, stop))
    return torch.as_tensor(np.asarray(rows, dtype=np.float32), device=device)


def thumbnail_groups(
    thumbs: np.ndarray | Rows, threshold: float, block: int = 2048, device: str = "cpu"
) -> np.ndarray:
    """`near_duplicate_groups` from the images' `thumbnails` (N, D): an array, or rows kept in the object
    store (`stages.pixels.StoredRows`), read a tile at a time. The similarities are computed tile by tile
    on `device` (a GPU with `score.use_gpu`); only the pairs over the threshold come back.

    Groups are stars, not chains: in row order, an image joins the first earlier *leader* (an image that
    joined no group) it is similar to, else it leads a group of its own. Every member is then a
    near-duplicate of the image prune keeps (the leader, first by row). Linking every similar pair instead
    chains look-alikes into one group: 149 of 300 Fashion-MNIST trousers, some pairs at cosine 0.75."""
    n = len(thumbs)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    groups = np.arange(n)
    leader = np.zeros(n, dtype=bool)
    for start in range(0, n, block):
        left = _tile(thumbs, start, start + block, device)
        first = np.full(len(left), -1)  # each row's first matching leader in the tiles before this one
        for column in range(0, start, block):  # square tiles: memory O(block²) however large N grows
            leads = torch.as_tensor(leader[column : column + block], device=device)
            if not bool(leads.any()):
                continue
            hits = (left @ _tile(thumbs, column, column + block, device).T >= threshold) & leads
            found = hits.any(1).cpu().numpy()
            at = column + hits.int().argmax(1).cpu().numpy()  # argmax: the first True
            first = np.where((first < 0) & found, at, first)
        within = torch.tril(left @ left.T >= threshold, diagonal=-1).cpu().numpy()  # pairs (r, c < r)
        similar = within.any(1)
        for r in range(len(left)):  # in row order: a row's leaders in this tile are decided before it
            if first[r] >= 0:
                groups[start + r] = first[r]
                continue
            earlier = np.flatnonzero(within[r, :r] & leader[start : start + r]) if similar[r] else ()
            if len(earlier):
                groups[start + r] = start + earlier[0]
            else:
                leader[start + r] = True
    log.info("near-duplicates: %d images in %d groups", int((groups != np.arange(n)).sum()), _multi(groups))
    return groups


class DuplicateGroups(Stage):
    """All-to-all: `duplicate_group` per image (see `near_duplicate_groups`), so that prune can keep one
    image per group. Global by nature: every image is compared with every other."""

    name = "duplicates"
    kind = ALL_TO_ALL
    inputs = ("thumbnail",)
    outputs = ("duplicate_group",)

    def __init__(self, threshold: float, device: Device | None = None) -> None:
        self.threshold = threshold  # cosine similarity of mean-removed thumbnails (score.duplicate_threshold)
        self.device = device or Device()

    def process(self, batch: Batch) -> Batch:
        groups = self.device.run(thumbnail_groups, batch["thumbnail"], self.threshold)
        return {**batch, "duplicate_group": groups}


@dataclass(frozen=True)
class Device:
    """Where a global step's tensor work runs: here on the CPU, or (`gpus` > 0, `score.use_gpu`) in a Ray
    task holding that share of a GPU, since the driver that runs the all-to-all stages often has none."""

    gpus: float = 0.0

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args, device=...)` on this device."""
        if not self.gpus:
            return fn(*args, device="cpu")
        return ray.get(ray.remote(num_cpus=1, num_gpus=self.gpus)(fn).remote(*args, device="cuda"))


def _multi(groups: np.ndarray) -> int:
    _, counts = np.unique(groups, return_counts=True)
    return int((counts > 1).sum())


def encoder_embeddings(
    url: str, images: np.ndarray | Iterable[np.ndarray], storage_options: dict[str, Any] | None = None
) -> np.ndarray:
    """Embed images (N, S, S, 3) uint8, or batches of them in turn, with a maskdiet MAE encoder
    (`encoder.pth`, an output folder or a checkpoint; timm ViT keys): the frozen encoder's mean patch token,
    L2-normalised: (N, D), the batches' rows one after another. Loading and feature extraction are
    `pipeline.models.checkpoint`'s, so scoring sees the same features as the kNN probe."""
    from pipeline.models.checkpoint import (
        encoder_from_state,
        extract_features,
        read_encoder_state,
        size_from_state,
    )

    state = read_encoder_state(url, storage_options)
    size = size_from_state(state)
    encoder = encoder_from_state(size, state)
    batches = [images] if isinstance(images, np.ndarray) else images
    parts = [F.normalize(extract_features(encoder, batch, pool="mean"), dim=1).numpy() for batch in batches]
    return np.concatenate(parts) if parts else np.zeros((0, size.embed_dim), np.float32)
