"""Evaluation of a pretrained encoder on labeled images, beside two baselines it has to beat.

    maskdiet evaluate --checkpoint out/pretrain/encoder.pth --data /tmp/digits [--test-data /tmp/test]

The encoder (`encoder.pth`, timm ViT keys) is loaded into our MAE's encoder and turned into one feature per
image (`evaluate.pool`: the CLS token or the mean of the patch tokens, after the final norm). Its `encode`
computes timm's `VisionTransformer.forward_features` on the same weights (tested in
tests/pipeline/models/test_mae.py), without importing timm, which costs about 5 s on 2 cores. The labeled images
are split once (seeded, `evaluate.holdout` to test), or the test images come from `evaluate.test_data` (an
official test split); every protocol uses the same split:

- kNN (DINO's weighted kNN): cosine similarity to every training feature, the k = 20 nearest vote with
  weight exp(sim / T), T = 0.07; the class with the largest summed weight wins.
- Linear probe (MAE's): BatchNorm without affine parameters, then a linear layer, trained with SGD on the
  frozen features; accuracy on the test split.
- Fine-tune (MAE's primary protocol, shortened): encoder + linear head trained end to end for
  `evaluate.finetune_epochs` with AdamW, layer-wise lr decay and label smoothing, on a copy of the encoder.

Baselines: the same architecture at its initialisation (MAE's init, the state pretraining starts from), and
the raw pixels themselves (flattened after the encoder's input normalisation; kNN and probe only). Beating
random init says pretraining learned something; beating the pixels says it learned something worth having.

Labels: folder names (or the labels table / manifest labels), except where the folder carries demo truth
(`_truth.parquet`, written by `maskdiet demo-data`): there the true labels are used, never the injected noisy
ones, so a score measures the encoder and not the noise.

Device (`evaluate.device`: auto | cpu | cuda; auto = cuda when this process sees a GPU): feature extraction
(`extract_features`: pinned non-blocking uint8 copies, normalised on the device, bf16 autocast, features
back on the CPU), kNN (the similarity matmul, top-k and votes), the linear probe (float32; its batch orders
are drawn on the CPU, so a seed gives the same orders everywhere) and the fine-tune (bf16 autocast) all run
there; on the CPU every number is what it was before the device path existed. The labels and images stay
on the host, and each protocol moves what it needs. `evaluate` runs in the calling process, not in a Ray
task: the `maskdiet evaluate` CLI, or `maskdiet run` (the driver, or a Ray job's entrypoint when submitted
with `maskdiet jobs submit`), so that process needs the GPU: submit the job to a node with one (auto then
finds it) or leave auto to fall back to the CPU. `evaluation.json` records the device it ran on.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import Config
from pipeline.core.errors import UserInputError
from pipeline.core.runs import TRUTH_NAME
from pipeline.core.storage import exists, join, read_bytes
from pipeline.models.augment import to_device
from pipeline.models.checkpoint import (
    ENCODER_PREFIXES,
    encoder_from_state,
    extract_features,
    pool_tokens,
    read_encoder_state,
    size_from_state,
)
from pipeline.models.mae import MAESize, MaskedAutoencoder, normalize_images

log = logging.getLogger(__name__)

FINETUNE_WEIGHT_DECAY = 0.05  # MAE's fine-tuning recipe
FINETUNE_LABEL_SMOOTHING = 0.1
FINETUNE_WARMUP = 0.1  # share of the steps with a linear lr warmup


@dataclass
class EvaluateResult:
    knn_accuracy: float
    probe_accuracy: float
    random_knn_accuracy: float  # same architecture, untrained
    random_probe_accuracy: float
    pixel_knn_accuracy: float  # flattened, normalised pixels: the baseline an encoder has to beat
    pixel_probe_accuracy: float
    finetune_accuracy: float | None  # None: evaluate.finetune_epochs = 0
    random_finetune_accuracy: float | None
    num_train: int
    num_test: int
    num_classes: int
    feature_dim: int
    model: str  # timm architecture name
    seconds: float
    labels: str = "folder names"  # where the labels came from (e.g. demo truth)
    test: str = "holdout"  # the test split: `holdout <share>` or the test_data URL
    device: str = "cpu"  # where features, probes and fine-tune ran (`evaluate.device` resolved)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LabeledSplit:
    """The images every protocol learns from and is tested on: (N, S, S, 3) uint8 and (N,) int64 labels,
    label i being classes[i]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    labels: str  # where the labels came from
    test: str  # where the test split came from


# ---------------------------------------------------------------------------------------------- device


def resolve_device(choice: str) -> torch.device:
    """`evaluate.device` as a torch device: auto is cuda when this process sees a GPU, else the CPU (so a
    laptop and a GPU node run the same config); an explicit cuda without one is the user's to fix, and
    says how, rather than failing deep inside torch."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            f"evaluate.device is cuda but this process sees no CUDA GPU (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); pass --set evaluate.device=cpu (or auto), or run "
            "evaluate where there is a GPU"
        )
    return torch.device(choice)


# ---------------------------------------------------------------------------------------------- probes


def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    device: torch.device | None = None,
) -> float:
    """DINO's weighted kNN: cosine similarity, top-k neighbours vote with exp(sim / T). Test rows go `chunk`
    at a time, so the similarity matrix never holds more than chunk × train entries (Fashion-MNIST's 10,000
    × 60,000 would be 2.4 GB). Runs on `device` (None: where `train_x` is); the count of correct votes stays
    there until the end, so a GPU is never waited on per chunk."""
    device = device or train_x.device
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_n = F.normalize(to_device(train_x, device), dim=1)
    train_y, test_y = to_device(train_y, device), to_device(test_y, device)
    k = min(k, len(train_x))
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(test_x), chunk):
        test_n = F.normalize(to_device(test_x[start : start + chunk], device), dim=1)
        sims, idx = (test_n @ train_n.T).topk(k, dim=1)  # (t, k)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(test_n), num_classes, device=device)
        votes.scatter_add_(1, train_y[idx], weights)
        correct += (votes.argmax(dim=1) == test_y[start : start + chunk]).sum()
    return int(correct) / max(1, len(test_x))


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 30,
    lr: float = 0.1,
    batch: int = 256,
    seed: int = 0,
    device: torch.device | None = None,
) -> float:
    """MAE's linear probe: BatchNorm1d(affine=False) + Linear on frozen features, SGD with momentum and a
    cosine lr; returns test accuracy. Runs in float32 on `device` (None: where `train_x` is); the head's
    init and the batch orders are drawn on the CPU, so a seed gives the same ones on every device."""
    device = device or train_x.device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Sequential(
        nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6), nn.Linear(train_x.shape[1], num_classes)
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    head.to(device)
    train_x, train_y = to_device(train_x, device), to_device(train_y, device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, -(-len(train_x) // batch))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    head.train()
    for _ in range(epochs):
        order = to_device(torch.randperm(len(train_x), generator=generator), device)
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
        predicted = head(to_device(test_x, device)).argmax(dim=1)
        return float((predicted == to_device(test_y, device)).float().mean())


def pixel_features(images: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """images (N, S, S, 3) uint8 → (N, 3·S·S) float: the pixels as the encoder sees them (ImageNet
    mean/std), flattened. kNN and the probe on these are the floor an encoder's features must clear."""
    out = [
        normalize_images(torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))).flatten(1)
        for start in range(0, len(images), batch)
    ]
    return torch.cat(out) if out else torch.zeros(0, 3 * images.shape[1] * images.shape[2])


# ---------------------------------------------------------------------------------------------- fine-tune


def _layer_id(name: str, depth: int) -> int:
    """MAE's layer index for layer-wise lr decay: embeddings 0, block i → i + 1, the final norm depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def finetune_param_groups(
    encoder: MaskedAutoencoder, head: nn.Module, lr: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups as MAE's `param_groups_lrd`: lr × layer_decay^(depth + 1 − layer), so the layers near the
    input move least; no weight decay on biases, norms and tokens (1-D tensors). The decoder is left out."""
    depth = len(encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    named = [(n, p) for n, p in encoder.named_parameters() if n.startswith(ENCODER_PREFIXES)]
    named += [(f"head.{n}", p) for n, p in head.named_parameters()]
    for name, param in named:
        if not param.requires_grad:
            continue  # the fixed sin-cos position embedding
        layer = _layer_id(name, depth)
        decay = param.ndim > 1 and not name.startswith(("cls_token", "pos_embed"))
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "lr": lr * layer_decay ** (depth + 1 - layer),
                "weight_decay": FINETUNE_WEIGHT_DECAY if decay else 0.0,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def _warmup_cosine(total: int) -> Any:
    """lr multiplier per step: linear warmup over FINETUNE_WARMUP of the steps, then cosine to 0."""
    warmup = max(1, round(total * FINETUNE_WARMUP))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


def finetune_accuracy(
    encoder: MaskedAutoencoder,
    train_images: np.ndarray,
    train_y: torch.Tensor,
    test_images: np.ndarray,
    test_y: torch.Tensor,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    layer_decay: float = 0.75,
    batch: int = 64,
    pool: str = "mean",
    seed: int = 0,
    device: torch.device | None = None,
) -> float:
    """Test accuracy after training a copy of `encoder` plus a linear head end to end on the train images
    (MAE's fine-tuning, short: AdamW, layer-wise lr decay, label smoothing, warmup + cosine; no mixup or
    augmentation). `encoder` itself is not changed. Runs on `device` (None: the GPU when there is one), under
    bf16 autocast on CUDA as pretraining does; there the loss is checked for NaN/inf once per epoch rather
    than per step, so the host never waits on the GPU mid-epoch (on the CPU a check costs nothing)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    model = copy.deepcopy(encoder).to(device).train()
    head = nn.Linear(model.size.embed_dim, num_classes).to(device)
    nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE's head init
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(finetune_param_groups(model, head, lr, layer_decay), betas=(0.9, 0.999))
    steps = epochs * max(1, -(-len(train_images) // batch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))

    def logits(images: np.ndarray) -> torch.Tensor:
        x = normalize_images(to_device(torch.from_numpy(np.ascontiguousarray(images)), device))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            return head(pool_tokens(model.encode(x), pool)).float()  # the loss in float32

    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # CUDA: any step's loss not finite
    for epoch in range(epochs):
        order = torch.randperm(len(train_images), generator=generator).numpy()
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            target = to_device(train_y[rows], device)
            loss = F.cross_entropy(
                logits(train_images[rows]), target, label_smoothing=FINETUNE_LABEL_SMOOTHING
            )
            if on_gpu:
                nonfinite |= ~torch.isfinite(loss)
            elif not torch.isfinite(loss):
                raise UserInputError(f"fine-tune loss is {loss.item()}; lower evaluate.finetune_lr ({lr})")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if on_gpu and bool(nonfinite):
            raise UserInputError(
                f"fine-tune loss was not finite in epoch {epoch + 1}; lower evaluate.finetune_lr ({lr})"
            )
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_images), 256):
            pred = logits(test_images[start : start + 256]).argmax(dim=1).cpu()
            correct += int((pred == test_y[start : start + 256]).sum())
    return correct / max(1, len(test_images))


# ---------------------------------------------------------------------------------------------- data


def _tail(path: str) -> str:
    """`<class folder>/<file>`: how a demo image is matched to its truth row even after the folder moved."""
    return "/".join(path.rstrip("/").split("/")[-2:])


def demo_truth(
    data_url: str, classes: list[str], storage_options: dict[str, Any] | None = None
) -> dict[str, str] | None:
    """{`<class>/<file>`: true class name} from the folder's `_truth.parquet` (written by `maskdiet
    demo-data`); None when there is none or it is not demo truth. `classes` names an older file's
    `true_label` indices (the sorted class folders)."""
    url = join(data_url, TRUTH_NAME)
    if not exists(url, storage_options):
        return None
    try:
        truth = pd.read_parquet(pd.io.common.BytesIO(read_bytes(url, storage_options)))
    except (OSError, ValueError) as e:  # a user's folder may hold an unrelated file of that name
        log.warning("evaluate: ignoring %s (%s)", url, e)
        return None
    if "path" not in truth.columns:
        return None
    if "true_class" in truth.columns:
        names = truth["true_class"].astype(str)
    elif "true_label" in truth.columns:
        names = truth["true_label"].map(lambda i: classes[int(i)] if 0 <= int(i) < len(classes) else None)
    else:
        return None
    return {_tail(p): n for p, n in zip(truth["path"].astype(str), names, strict=True) if n is not None}


def labeled_names(
    data_url: str, config: Config, labels_table: str | None = None
) -> tuple[list[str], list[str], str]:
    """(paths, class name per path, where the names came from) of the labeled images at `data_url`: a
    manifest / labels Parquet (rows with label ≥ 0; `class_name`, else the label) or an image folder
    (`<root>/<class>/<file>`, or `labels_table` as `data.labels`), with demo truth taking precedence."""
    if data_url.endswith(".parquet"):
        from stages.manifest import read_table

        frame, _ = read_table(data_url, config.data.storage_options)
        if not {"path", "label"} <= set(frame.columns):  # an image table, not a manifest
            raise UserInputError(
                f"{data_url} has no path/label columns: evaluation reads an image folder or a manifest; "
                "curate an image table or shards first and pass --data OUTPUT/manifest.parquet"
            )
        frame = frame[frame["label"].fillna(-1).astype(int) >= 0].sort_values("path")
        names = frame["label"].astype(np.int64).astype(str)
        if "class_name" in frame.columns:
            names = frame["class_name"].where(frame["class_name"].notna(), names).astype(str)
        return frame["path"].astype(str).tolist(), names.tolist(), "manifest labels"
    from stages.read import list_images

    listing = list_images(config.data.model_copy(update={"input": data_url, "labels": labels_table}))
    rows = [i for i, label in enumerate(listing.labels) if label >= 0]
    paths = [listing.paths[i] for i in rows]
    names = [listing.classes[listing.labels[i]] for i in rows]
    truth = demo_truth(data_url, listing.classes, config.data.storage_options)
    if truth:
        return paths, [truth.get(_tail(p), n) for p, n in zip(paths, names, strict=True)], "demo truth"
    return paths, names, "labels table" if labels_table else "folder names"


def load_named(
    data_url: str, config: Config, size: int, labels_table: str | None = None
) -> tuple[np.ndarray, list[str], str]:
    """Decode the labeled images at `size`: (images (N, S, S, 3) uint8, class names (N,), label source).
    Objects that do not decode are skipped (the evaluation set may be a raw folder with bad files)."""
    from stages.stream import decode_flagged

    paths, names, source = labeled_names(data_url, config, labels_table)
    images, ok, reasons = decode_flagged(paths, config, size)
    for path, reason in reasons.items():
        log.info("evaluate: skipping %s (%s)", path, reason)
    if not ok.any():
        raise UserInputError(f"no decodable labeled images under {data_url}")
    return images[ok], [n for n, good in zip(names, ok, strict=True) if good], source


def load_labeled(data_url: str, config: Config, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 3) uint8, labels (N,) int64, the index into the sorted class names)."""
    images, names, _ = load_named(data_url, config, size, config.data.labels)
    classes = sorted(set(names))
    return images, np.asarray([classes.index(n) for n in names], dtype=np.int64)


def load_split(data_url: str, config: Config, size: int) -> LabeledSplit:
    """The evaluation split: `data_url`'s labeled images (read with `data.labels` when set), tested on
    `evaluate.test_data` when set (folder names or its demo truth), else on a seeded `evaluate.holdout`
    share of them. Class names index both sides alike, even when the two folders differ."""
    ev = config.evaluate
    images, names, source = load_named(data_url, config, size, config.data.labels)
    if ev.test_data:
        test_images, test_names, _ = load_named(ev.test_data, config, size)
        train_images, train_names, test = images, names, ev.test_data
    else:
        train_idx, test_idx = split_indices(len(images), ev.holdout, ev.seed)
        train_images, test_images = images[train_idx], images[test_idx]
        train_names = [names[i] for i in train_idx]
        test_names = [names[i] for i in test_idx]
        test = f"holdout {ev.holdout:g}"
    classes = sorted(set(train_names) | set(test_names))
    index = {c: i for i, c in enumerate(classes)}
    return LabeledSplit(
        train_images=train_images,
        train_labels=np.asarray([index[n] for n in train_names], dtype=np.int64),
        test_images=test_images,
        test_labels=np.asarray([index[n] for n in test_names], dtype=np.int64),
        classes=classes,
        labels=source,
        test=test,
    )


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: a seeded permutation, `holdout` of the rows to test."""
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, round(n * holdout))
    return np.sort(order[cut:]), np.sort(order[:cut])


# ---------------------------------------------------------------------------------------------- entry


def evaluate_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    config: Config,
    device: torch.device | None = None,
) -> tuple[float, float]:
    """(kNN accuracy, linear-probe accuracy) for one set of features, both on `device` (None: where
    `train_x` is). The features move there once, shared by both protocols."""
    ev = config.evaluate
    device = device or train_x.device
    train_x, test_x = to_device(train_x, device), to_device(test_x, device)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, ev.knn_k, ev.knn_temperature, device=device)
    probe = linear_probe_accuracy(
        train_x,
        train_y,
        test_x,
        test_y,
        ev.probe_epochs,
        ev.probe_lr,
        ev.probe_batch_size,
        ev.seed,
        device=device,
    )
    return knn, probe


def encoder_scores(
    encoder: MaskedAutoencoder,
    split: LabeledSplit,
    config: Config,
    device: torch.device,
    finetune: bool = True,
) -> dict[str, float | None]:
    """{knn, probe, finetune} of one encoder on `split`, on `device`; finetune is None when
    `evaluate.finetune_epochs` is 0 or `finetune` is off. The fine-tune trains a copy: `encoder` is kept."""
    ev = config.evaluate
    train_y, test_y = torch.from_numpy(split.train_labels), torch.from_numpy(split.test_labels)
    train_x = extract_features(encoder, split.train_images, ev.pool, ev.batch_size, device)
    test_x = extract_features(encoder, split.test_images, ev.pool, ev.batch_size, device)
    knn, probe = evaluate_features(train_x, train_y, test_x, test_y, config, device)
    scores: dict[str, float | None] = {"knn": knn, "probe": probe, "finetune": None}
    if finetune and ev.finetune_epochs > 0:
        scores["finetune"] = split_finetune_accuracy(encoder, split, config, device)
    return scores


def split_finetune_accuracy(
    encoder: MaskedAutoencoder, split: LabeledSplit, config: Config, device: torch.device
) -> float:
    """`finetune_accuracy` on `split` with the `evaluate.finetune_*` recipe (a copy of `encoder` trains)."""
    ev = config.evaluate
    began = time.perf_counter()
    accuracy = finetune_accuracy(
        encoder,
        split.train_images,
        torch.from_numpy(split.train_labels),
        split.test_images,
        torch.from_numpy(split.test_labels),
        epochs=ev.finetune_epochs,
        lr=ev.finetune_lr,
        layer_decay=ev.finetune_layer_decay,
        batch=ev.finetune_batch_size,
        pool=ev.pool,
        seed=ev.seed,
        device=device,
    )
    log.info("evaluate: fine-tune took %.1f s", time.perf_counter() - began)
    return accuracy


def pixel_scores(split: LabeledSplit, config: Config, device: torch.device) -> dict[str, float]:
    """{knn, probe} of the raw pixels on `split`: the baseline every encoder has to beat."""
    train_y, test_y = torch.from_numpy(split.train_labels), torch.from_numpy(split.test_labels)
    train_x, test_x = pixel_features(split.train_images), pixel_features(split.test_images)
    knn, probe = evaluate_features(train_x, train_y, test_x, test_y, config, device)
    return {"knn": knn, "probe": probe}


def random_encoder(size: MAESize, config: Config) -> MaskedAutoencoder:
    """The architecture at its init, drawn on the CPU from `evaluate.seed`: the same baseline on every
    device and in every run."""
    torch.manual_seed(config.evaluate.seed)
    return encoder_from_state(size, None)


def evaluate_split(
    state: dict[str, torch.Tensor], size: MAESize, split: LabeledSplit, config: Config
) -> EvaluateResult:
    """Every protocol on `split` for the encoder weights `state`, the same architecture at its init, and
    (kNN, probe) the raw pixels, on `evaluate.device`. Both encoders are built (and the random one drawn)
    on the CPU, so the baseline is the same on every device, then move there with their first batch."""
    start = time.perf_counter()
    device = resolve_device(config.evaluate.device)
    log.info("evaluate: on %s", device)
    trained = encoder_scores(encoder_from_state(size, state), split, config, device)
    random_init = encoder_scores(random_encoder(size, config), split, config, device)
    pixels = pixel_scores(split, config, device)
    result = EvaluateResult(
        knn_accuracy=trained["knn"],  # type: ignore[arg-type]
        probe_accuracy=trained["probe"],  # type: ignore[arg-type]
        random_knn_accuracy=random_init["knn"],  # type: ignore[arg-type]
        random_probe_accuracy=random_init["probe"],  # type: ignore[arg-type]
        pixel_knn_accuracy=pixels["knn"],
        pixel_probe_accuracy=pixels["probe"],
        finetune_accuracy=trained["finetune"],
        random_finetune_accuracy=random_init["finetune"],
        num_train=len(split.train_labels),
        num_test=len(split.test_labels),
        num_classes=len(split.classes),
        feature_dim=size.embed_dim,
        model=size.timm_name,
        seconds=time.perf_counter() - start,
        labels=split.labels,
        test=split.test,
        device=device.type,
    )
    log.info("evaluate: %s", result)
    return result


def evaluate_encoder(checkpoint_url: str, data_url: str, config: Config) -> EvaluateResult:
    """Evaluate the encoder at `checkpoint_url` (encoder.pth, output folder or checkpoint) on the labeled
    images at `data_url` (split per `load_split`): see the module docstring."""
    start = time.perf_counter()
    resolve_device(config.evaluate.device)  # a cuda without a GPU fails here, before any image is decoded
    state = read_encoder_state(checkpoint_url, config.data.storage_options)
    size = size_from_state(state, config.pretrain.model)
    split = load_split(data_url, config, size.img_size)
    result = evaluate_split(state, size, split, config)
    result.seconds = time.perf_counter() - start
    return result
