"""Frozen-encoder evaluation: kNN and linear-probe accuracy on a labeled split, against random init.

    maskdiet evaluate --checkpoint out/pretrain/encoder.pth --data /tmp/digits

The encoder (`encoder.pth`, timm ViT keys) is loaded into our MAE's encoder, frozen, and turned into one
feature per image (`evaluate.pool`: the CLS token or the mean of the patch tokens, after the final norm).
Its `encode` computes timm's `VisionTransformer.forward_features` on the same weights (tested in
tests/pipeline/test_mae.py), without importing timm, which costs about 5 s on 2 cores. The labeled images
are split once (seeded, `evaluate.holdout` to test) and both probes use the same split:

- kNN (DINO's weighted kNN): cosine similarity to every training feature, the k = 20 nearest vote with
  weight exp(sim / T), T = 0.07; the class with the largest summed weight wins.
- Linear probe (MAE's): BatchNorm without affine parameters, then a linear layer, trained with SGD on the
  frozen features; accuracy on the test split.

The baseline is the same architecture at its initialisation (MAE's init, the state pretraining starts
from), so "pretraining helped" means beating it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import Config
from pipeline.core.errors import UserInputError
from pipeline.models.checkpoint import (
    encoder_from_state,
    extract_features,
    read_encoder_state,
    size_from_state,
)

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    knn_accuracy: float
    probe_accuracy: float
    random_knn_accuracy: float  # same architecture, untrained
    random_probe_accuracy: float
    num_train: int
    num_test: int
    num_classes: int
    feature_dim: int
    model: str  # timm architecture name
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- probes


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """DINO's weighted kNN: cosine similarity, top-k neighbours vote with exp(sim / T)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_n = F.normalize(train_x, dim=1)
    test_n = F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    sims, idx = (test_n @ train_n.T).topk(k, dim=1)  # (T, k)
    weights = (sims / temperature).exp()
    votes = torch.zeros(len(test_x), num_classes)
    votes.scatter_add_(1, train_y[idx], weights)
    return float((votes.argmax(dim=1) == test_y).float().mean())


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 30,
    lr: float = 0.1,
    batch: int = 256,
    seed: int = 0,
) -> float:
    """MAE's linear probe: BatchNorm1d(affine=False) + Linear on frozen features, SGD with momentum and a
    cosine lr; returns test accuracy."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Sequential(
        nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6), nn.Linear(train_x.shape[1], num_classes)
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, -(-len(train_x) // batch))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            if len(rows) < 2:
                continue  # BatchNorm needs two samples
            loss = F.cross_entropy(head(train_x[rows]), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    with torch.no_grad():
        return float((head(test_x).argmax(dim=1) == test_y).float().mean())


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: a seeded permutation, `holdout` of the rows to test."""
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, round(n * holdout))
    return np.sort(order[cut:]), np.sort(order[:cut])


# ---------------------------------------------------------------------------------------------- data


def labeled_paths(data_url: str, config: Config) -> tuple[list[str], np.ndarray]:
    """(paths, labels) of labeled images: a manifest / labels Parquet (rows with label ≥ 0) or an image
    folder (`<root>/<class>/<file>`, as `maskdiet curate` reads it)."""
    if data_url.endswith(".parquet"):
        from stages.manifest import read_table

        frame, _ = read_table(data_url, config.data.storage_options)
        frame = frame[frame["label"].fillna(-1).astype(int) >= 0].sort_values("path")
        return frame["path"].astype(str).tolist(), frame["label"].astype(np.int64).to_numpy()
    from stages.read import list_images

    listing = list_images(config.data.model_copy(update={"input": data_url}))
    labels = np.asarray(listing.labels, dtype=np.int64)
    keep = labels >= 0
    return [p for p, k in zip(listing.paths, keep, strict=True) if k], labels[keep]


def load_labeled(data_url: str, config: Config, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode the labeled images at `size`: (images (N, S, S, 3) uint8, labels (N,)). Objects that do not
    decode are skipped (the evaluation set may be a raw folder with bad files)."""
    from stages.stream import decode_flagged

    paths, labels = labeled_paths(data_url, config)
    images, ok, reasons = decode_flagged(paths, config, size)
    for path, reason in reasons.items():
        log.info("evaluate: skipping %s (%s)", path, reason)
    if not ok.any():
        raise UserInputError(f"no decodable labeled images under {data_url}")
    return images[ok], labels[ok]


# ---------------------------------------------------------------------------------------------- entry


def evaluate_features(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, config: Config
) -> tuple[float, float]:
    """(kNN accuracy, linear-probe accuracy) for one set of features."""
    ev = config.evaluate
    knn = knn_accuracy(train_x, train_y, test_x, test_y, ev.knn_k, ev.knn_temperature)
    probe = linear_probe_accuracy(
        train_x, train_y, test_x, test_y, ev.probe_epochs, ev.probe_lr, ev.probe_batch_size, ev.seed
    )
    return knn, probe


def evaluate_encoder(
    checkpoint_url: str,
    data_url: str,
    config: Config,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> EvaluateResult:
    """kNN and linear-probe accuracy of the frozen encoder at `checkpoint_url` (encoder.pth, output folder
    or checkpoint) on the labeled images at `data_url` — or on `images` / `labels` when given — and the
    same for the untrained encoder of the same size."""
    start = time.perf_counter()
    ev = config.evaluate
    state = read_encoder_state(checkpoint_url, config.data.storage_options)
    size = size_from_state(state, config.pretrain.model)
    if images is None or labels is None:
        images, labels = load_labeled(data_url, config, size.img_size)
    train_idx, test_idx = split_indices(len(images), ev.holdout, ev.seed)
    train_y = torch.from_numpy(labels[train_idx])
    test_y = torch.from_numpy(labels[test_idx])
    torch.manual_seed(ev.seed)
    results = []
    for weights in (state, None):
        encoder = encoder_from_state(size, weights)
        features = extract_features(encoder, images, ev.pool, ev.batch_size)
        results.append(evaluate_features(features[train_idx], train_y, features[test_idx], test_y, config))
    (knn, probe), (random_knn, random_probe) = results
    result = EvaluateResult(
        knn_accuracy=knn,
        probe_accuracy=probe,
        random_knn_accuracy=random_knn,
        random_probe_accuracy=random_probe,
        num_train=len(train_idx),
        num_test=len(test_idx),
        num_classes=int(labels.max()) + 1,
        feature_dim=size.embed_dim,
        model=size.timm_name,
        seconds=time.perf_counter() - start,
    )
    log.info("evaluate: %s", result)
    return result
