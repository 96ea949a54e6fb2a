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
(transitively). The comparison is all-pairs in blocks: O(N²) time, O(block·N) memory.

Both are global, so they run as all-to-all stages: `DuplicateGroups` here, and the prototype distance inside
`stages.score.ScoreStage` (its k-means prototypes are cached with the proxies, so it lives with them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stages.base import ALL_TO_ALL, Batch, Stage

log = logging.getLogger(__name__)


def prototype_scores(
    embedding: np.ndarray, num_clusters: int, seed: int = 0, centroids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each embedding (N, D) to its nearest centroid: (N,), and the centroids (k, D).

    With `centroids` given (from an earlier run, kept in the score cache) no clustering is done, so new
    images are measured against the same prototypes as the old ones.
    """
    x = np.asarray(embedding, dtype=np.float64)
    if centroids is None:
        from sklearn.cluster import KMeans

        k = max(1, min(num_clusters, len(x)))
        centroids = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x).cluster_centers_
    d2 = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None, :]  # (N, k)
    return np.sqrt(np.maximum(d2.min(1), 0.0)), np.asarray(centroids)


def thumbnails(images: np.ndarray, side: int = 16) -> np.ndarray:
    """(N, S, S, 3) uint8 → (N, side²) float32: grey, area-downsampled, mean removed, unit L2 norm."""
    x = torch.from_numpy(np.asarray(images).astype(np.float32)).mean(-1)[:, None]  # (N, 1, S, S)
    x = F.adaptive_avg_pool2d(x, side).reshape(len(images), -1)  # (N, side²)
    x = x - x.mean(1, keepdim=True)
    return F.normalize(x, dim=1).numpy()


def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def near_duplicate_groups(images: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """Group id per image (N,) int64: the smallest row index in its near-duplicate group (its own index
    when it has no near-duplicate). Flat images (no contrast) are never grouped."""
    return thumbnail_groups(
        thumbnails(images) if len(images) else np.zeros((0, 256), np.float32), threshold, block
    )


def thumbnail_groups(thumbs: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """`near_duplicate_groups` from the images' `thumbnails` (N, D), computed where the pixels are."""
    n = len(thumbs)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    parent = np.arange(n)
    for start in range(0, n, block):
        sims = thumbs[start : start + block] @ thumbs[start:].T  # (b, N − start)
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i, j = start + r, start + c
            if j <= i:
                continue
            a, b = _find(parent, i), _find(parent, j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups = np.asarray([_find(parent, i) for i in range(n)], dtype=np.int64)
    log.info("near-duplicates: %d images in %d groups", int((groups != np.arange(n)).sum()), _multi(groups))
    return groups


class DuplicateGroups(Stage):
    """All-to-all: `duplicate_group` per image (see `near_duplicate_groups`), so that prune can keep one
    image per group. Global by nature: every image is compared with every other."""

    name = "duplicates"
    kind = ALL_TO_ALL
    inputs = ("thumbnail",)
    outputs = ("duplicate_group",)

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold  # cosine similarity of mean-removed thumbnails (score.duplicate_threshold)

    def process(self, batch: Batch) -> Batch:
        return {**batch, "duplicate_group": thumbnail_groups(batch["thumbnail"], self.threshold)}


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
