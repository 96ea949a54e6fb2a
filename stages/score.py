"""Score stage: how hard is each labeled example? EL2N, GraNd and forgetting from K briefly trained proxies.

The method is "Deep Learning on a Data Diet" (Paul, Ganguli, Dziugaite, 2021). K small classifiers
(different seeds) train for a few epochs on the decoded images — one Ray task each, the pixels put in the
object store once — then every example is scored by Ray Data `map_batches` tasks on the same, already warm
workers (or, with `score.compute=actors`, an actor pool that loads the K models once per actor). Higher is
harder for every score:

- `el2n`: E_k ‖softmax(f_k(x)) − onehot(y)‖₂ (L2 norm, not squared), eval mode, no augmentation;
  0 ≤ el2n ≤ √2, and a uniform prediction gives √(1 − 1/C). `el2n_std` is the std over the K models.
- `grand`: E_k ‖∇_θ ℓ(f_k(x), y)‖. `last-layer` (default) uses the exact closed form for the linear head
  on features h: ‖∇_{W,b} ℓ‖ = ‖p − y‖ · √(1 + ‖h‖²); `full` differentiates every weight per example
  (torch.func; fine for the small CNN, slow for big models).
- `forgetting` (Toneva et al. 2019): mean over the K models of the number of correct → incorrect
  transitions seen while training; an example never classified correctly counts `epochs` (more than any
  learned example can reach), as "unforgettable" examples count 0.

With `score.method=prototype` the proxies are trained label-free instead (predict which of 4 rotations was
applied) and only embeddings are used (see `stages/embed.py`).

`score_decoded` composes it all with the score cache (`stages/score_cache.py`): only cache misses are
scored; proxies trained by an earlier run with the same scoring config are reused.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import Config, ScoreConfig
from pipeline.core.errors import UserInputError
from pipeline.core.runtime import cluster_cpus

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)

SCORE_FRAME_COLUMNS = ("el2n", "el2n_std", "grand", "forgetting", "prototype", "duplicate_group", "score")
ROTATIONS = 4  # label-free proxy task: predict k in rot90(x, k)


# ---------------------------------------------------------------------------------------------- models


class ProxyNet(nn.Module):
    """A classifier split as `body` (images → features h, (N, D)) and a linear `head` (h → logits, (N, C)).

    The split is what GraNd's closed form and the prototype embeddings need.
    """

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, S, S) normalised floats → h: (N, D)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, S, S) → logits (N, C)."""
        return self.head(self.features(x))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def build_proxy(name: str, num_classes: int) -> ProxyNet:
    """`cnn-small`: a stride-2 stem and 2 conv blocks (16-32-64 channels, ~25k weights, ~0.7M
    multiply-adds at 32×32), global average pool, D = 64: K of them train on a laptop's cores in seconds.
    `resnet18`: timm's ResNet-18 trunk (random init), D = 512."""
    if name == "cnn-small":
        body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),  # (N, 16, S/2, S/2)
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # S/4
            _conv_block(16, 32),
            nn.MaxPool2d(2),  # S/8
            _conv_block(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (N, 64)
        )
        return ProxyNet(body, 64, num_classes)
    if name == "resnet18":
        import timm

        trunk = timm.create_model("resnet18", pretrained=False, num_classes=0)
        return ProxyNet(trunk, trunk.num_features, num_classes)
    raise UserInputError(f"unknown score.model {name!r}; expected cnn-small or resnet18")


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 → (N, 3, S, S) float32 roughly centred: (x/255 − 0.5) / 0.25."""
    x = torch.from_numpy(np.asarray(images).astype(np.float32)).permute(0, 3, 1, 2)  # a writable copy
    return (x / 255.0 - 0.5) / 0.25


def random_shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Translate each image by up to ±`pad` pixels (reflect padding): cheap augmentation, no flips
    (a flipped digit is another digit)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)  # (N, 3, H, W+2p)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)  # (N, 3, H, W)


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate image i of x (N, 3, S, S) by k[i] quarter turns."""
    out = x.clone()
    for quarter in range(1, ROTATIONS):
        idx = (k == quarter).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = torch.rot90(x[idx], quarter, dims=(2, 3))
    return out


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class ProxySpec:
    """What a proxy-training task needs from the config (small and picklable)."""

    model: str
    num_classes: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    augment: bool
    task: str = "labels"  # labels | rotation (label-free)
    threads: int = 1

    @classmethod
    def from_config(cls, config: ScoreConfig, num_classes: int, task: str = "labels") -> ProxySpec:
        return cls(
            model=config.model,
            num_classes=ROTATIONS if task == "rotation" else num_classes,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=config.weight_decay,
            augment=config.augment,
            task=task,
            threads=max(1, math.floor(config.cpus_per_model)),
        )


@dataclass
class ProxyResult:
    seed: int
    state: dict[str, torch.Tensor]  # the trained weights (CPU)
    forgetting: np.ndarray  # (N,) forgetting events per example (NaN for the rotation task)
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch


def train_proxy(images: np.ndarray, labels: np.ndarray, spec: ProxySpec, seed: int) -> ProxyResult:
    """Train one proxy for `spec.epochs` epochs (SGD, momentum 0.9, constant lr) and count forgetting.

    images: (N, S, S, 3) uint8; labels: (N,) int64 in [0, C). Forgetting follows Toneva et al.: each time
    an example is in a minibatch its (train-mode) correctness is recorded; a correct → incorrect step is one
    event. Examples never predicted correctly get `epochs` events.
    """
    torch.set_num_threads(spec.threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_proxy(spec.model, spec.num_classes)
    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=0.9, nesterov=True, weight_decay=spec.weight_decay
    )
    x_all = to_input(images)
    y_all = torch.from_numpy(np.array(labels, dtype=np.int64))  # a writable copy
    n = len(x_all)
    last_correct = torch.zeros(n, dtype=torch.bool)
    ever_correct = torch.zeros(n, dtype=torch.bool)
    events = torch.zeros(n, dtype=torch.int64)
    losses = []
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, spec.batch_size):
            idx = order[start : start + spec.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = x_all[idx]
            if spec.augment:
                x = random_shift(x, gen)
            if spec.task == "rotation":
                y = torch.randint(0, ROTATIONS, (len(idx),), generator=gen)
                x = rotate(x, y)
            else:
                y = y_all[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"proxy seed {seed}: non-finite loss {loss.item()}; lower score.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct = logits.detach().argmax(1) == y
            events[idx] += (last_correct[idx] & ~correct).long()
            last_correct[idx] = correct
            ever_correct[idx] |= correct
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
    recompute_batchnorm(model, x_all, spec.batch_size)
    forgetting = events.double().numpy()
    forgetting[~ever_correct.numpy()] = spec.epochs
    if spec.task == "rotation":
        forgetting[:] = np.nan
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ProxyResult(seed=seed, state=state, forgetting=forgetting, losses=losses)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Set BatchNorm running statistics to the exact mean/var of the final weights' activations on `x`
    (unaugmented). A few epochs at a high learning rate leave the running averages behind the weights,
    and eval-mode scores (EL2N is computed in eval mode) would then describe a different network."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if len(chunk) > 1:  # a 1×1 feature map of one image has no variance (BatchNorm raises)
            model(chunk)
    for m in norms:
        m.momentum = 0.1
    model.eval()


def train_proxies(
    images: np.ndarray,
    labels: np.ndarray,
    spec: ProxySpec,
    seeds: list[int],
    cpus_per_model: float = 1.0,
    progress: Progress | None = None,
) -> list[ProxyResult]:
    """Train one proxy per seed as parallel Ray tasks; the pixels go to the object store once."""
    images_ref, labels_ref = ray.put(images), ray.put(np.asarray(labels, dtype=np.int64))
    task = ray.remote(num_cpus=cpus_per_model)(train_proxy)
    pending = [task.remote(images_ref, labels_ref, spec, seed) for seed in seeds]
    order = {ref: i for i, ref in enumerate(pending)}
    results: list[ProxyResult | None] = [None] * len(pending)
    remaining = list(pending)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        results[order[done[0]]] = ray.get(done[0])
        if progress:
            progress("proxies", len(seeds) - len(remaining), len(seeds))
    out = [r for r in results if r is not None]
    for r in out:
        log.info("proxy seed %d: loss %.3f → %.3f", r.seed, r.losses[0], r.losses[-1])
    return out


# ---------------------------------------------------------------------------------------------- scores


def el2n(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """probs: (N, C) softmax outputs, labels: (N,) → (N,) ‖p − onehot(y)‖₂ (not squared)."""
    err = np.array(probs, dtype=np.float64, copy=True)
    err[np.arange(len(labels)), labels] -= 1.0
    return np.linalg.norm(err, axis=1)


def grand_last_layer(probs: np.ndarray, labels: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Exact ‖∇_{W,b} CE‖ for a linear head: ∇_W = (p − y) hᵀ, ∇_b = p − y, so the norm is
    ‖p − y‖ · √(‖h‖² + 1). probs (N, C), labels (N,), features (N, D) → (N,)."""
    sq = np.sum(np.asarray(features, dtype=np.float64) ** 2, axis=1)
    return el2n(probs, labels) * np.sqrt(sq + 1.0)


def grand_full(model: ProxyNet, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """‖∇_θ CE(f(x_i), y_i)‖ over every weight, per example (eval mode, BatchNorm frozen): (N,)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi[None],))
        return F.cross_entropy(logits, yi[None])

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    sq = sum(g.reshape(len(x), -1).pow(2).sum(1) for g in grads.values())
    return sq.sqrt().numpy()


class ScoreModels:
    """`map_batches` callable (one per actor): loads the K proxies once, scores rows by index.

    Input batch: `row` (int64 indices into the shared arrays). Output: `row`, `el2n`, `el2n_std`,
    `grand` (with labels), and `embedding` (N, K·D): the L2-normalised features of each proxy, concatenated.
    The images and labels arrive as object-store references, read zero-copy once per actor.
    """

    def __init__(
        self,
        states: list[dict[str, torch.Tensor]],
        spec: ProxySpec,
        images: np.ndarray,
        labels: np.ndarray | None,
        grand: str = "last-layer",
        embed: bool = False,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(threads)
        # Ray Data passes constructor arguments as given: resolve object-store references once per actor
        # (numpy arrays come back zero-copy from shared memory).
        states, images, labels = (
            ray.get(v) if isinstance(v, ray.ObjectRef) else v for v in (states, images, labels)
        )
        self.models = []
        for state in states:
            model = build_proxy(spec.model, spec.num_classes)
            model.load_state_dict(state)
            self.models.append(model.eval())
        self.images, self.labels = images, labels
        self.grand, self.embed = grand, embed

    @torch.inference_mode()
    def _forward(self, model: ProxyNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        h = model.features(x)
        return F.softmax(model.head(h), dim=1).numpy(), h.numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["row"], dtype=np.int64)
        x = to_input(self.images[rows])
        out: dict[str, np.ndarray] = {"row": rows}
        per_el2n, per_grand, embeddings = [], [], []
        for model in self.models:
            probs, h = self._forward(model, x)
            if self.labels is not None:
                y = self.labels[rows]
                per_el2n.append(el2n(probs, y))
                if self.grand == "full":
                    per_grand.append(grand_full(model, x, torch.from_numpy(y)))
                else:
                    per_grand.append(grand_last_layer(probs, y, h))
            if self.embed:
                embeddings.append(h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12))
        if per_el2n:
            stacked = np.stack(per_el2n)  # (K, N)
            out["el2n"] = stacked.mean(0)
            out["el2n_std"] = stacked.std(0)
            out["grand"] = np.stack(per_grand).mean(0)
        if embeddings:
            out["embedding"] = np.concatenate(embeddings, axis=1).astype(np.float32)
        return out


def score_batch(batch: dict[str, np.ndarray], batch_size: int, **models: Any) -> dict[str, np.ndarray]:
    """`map_batches` function for `score.compute=tasks`: one block of rows, scored `batch_size` at a time
    by `ScoreModels(**models)` built once for the block.

    Building the K small proxies takes milliseconds, while an actor pool starts a fresh process per actor
    on every run (torch's import and the models: seconds, measured about 6–10 s on 2 CPUs); tasks run on
    Ray's already-started workers, warm from proxy training.
    """
    scorer = ScoreModels(**models)
    rows = np.asarray(batch["row"], dtype=np.int64)
    parts = [scorer({"row": rows[i : i + batch_size]}) for i in range(0, len(rows), batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def scoring_actors(config: ScoreConfig, rows: int) -> int:
    """Actor pool size: `score.actors`, else one per cluster CPU (at most 8), never more than batches."""
    size = config.actors or max(1, min(8, int(cluster_cpus())))
    return max(1, min(size, math.ceil(rows / config.score_batch_size)))


def rows_per_block(config: ScoreConfig, rows: int) -> int:
    """Rows per Ray Data block (one task or actor call each).

    Actors score one batch per call. A task pays for deserialising and building the K models (about
    a fifth of a 512-row batch's time on CPU), so it takes up to 8 batches — while still leaving about
    4 tasks per CPU, so the CPUs finish together and progress moves.
    """
    if config.compute == "actors":
        return config.score_batch_size
    batches = rows // (config.score_batch_size * 4 * max(1, int(cluster_cpus())))
    return config.score_batch_size * max(1, min(8, batches))


def score_rows(
    rows: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray | None,
    states: list[dict[str, torch.Tensor]],
    spec: ProxySpec,
    config: ScoreConfig,
    embed: bool = False,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Score `rows` (indices into images/labels) with the K proxies, as Ray Data tasks or an actor pool
    (`score.compute`). Returns columns keyed as in `ScoreModels`, in `rows` order.
    """
    if len(rows) == 0:
        return {"row": np.zeros(0, dtype=np.int64)}
    # The blocks are made on the driver: no upstream Ray Data task has to compete with the scorers for
    # CPUs (a repartition here deadlocked once an actor pool held every CPU), and each block is one call
    # (`batch_size=None`), not a batch spliced from two blocks.
    rows = np.asarray(rows, dtype=np.int64)
    step = rows_per_block(config, len(rows))
    ds = ray.data.from_numpy([rows[i : i + step] for i in range(0, len(rows), step)])
    ds = ds.rename_columns({"data": "row"})
    # Ray Data's per-operator reservation held the scoring tasks to one at a time for the first second
    # on 2 CPUs (measured); with one operator there is nothing to reserve against.
    ds.context.op_resource_reservation_enabled = False
    models = {
        "states": ray.put(states),
        "spec": spec,
        "images": ray.put(images),
        "labels": None if labels is None else ray.put(np.asarray(labels, dtype=np.int64)),
        "grand": config.grand,
        "embed": embed,
    }
    common: dict[str, Any] = {"batch_size": None, "batch_format": "numpy", "num_cpus": 1}
    if config.compute == "actors":
        pool = ray.data.ActorPoolStrategy(size=scoring_actors(config, len(rows)))
        scored = ds.map_batches(ScoreModels, fn_constructor_kwargs=models, compute=pool, **common)
    else:
        models["batch_size"] = config.score_batch_size
        scored = ds.map_batches(score_batch, fn_kwargs=models, **common)
    parts: list[dict[str, np.ndarray]] = []
    done = 0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(batch)
        done += len(batch["row"])
        if progress:
            progress("score", done, len(rows))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    position = {r: i for i, r in enumerate(merged["row"].tolist())}
    order = np.asarray([position[r] for r in np.asarray(rows).tolist()])
    return {k: v[order] for k, v in merged.items()}


# ---------------------------------------------------------------------------------------------- compose


@dataclass
class ScoreOutcome:
    """The decoded frame with score columns (higher = harder), and how much work the cache saved."""

    frame: (
        pd.DataFrame
    )  # decoded columns + el2n, el2n_std, grand, forgetting, prototype, duplicate_group, score
    scored: int  # examples scored this run (cache misses)
    cached: int  # examples whose scores came from the cache
    seconds: dict[str, float] = field(default_factory=dict)  # a timer per phase
    losses: list[list[float]] = field(default_factory=list)  # per proxy trained this run: loss per epoch


def score_decoded(decoded: Any, config: Config, progress: Progress | None = None) -> ScoreOutcome:
    """Score every decoded image per `config.score`; reuse cached scores and proxies where the key matches.

    `decoded` is a `pipeline.curate.Decoded` (frame in image order, images N×S×S×3 uint8). The returned
    frame has `score` set to the column named by `score.method`.
    """
    from stages.embed import near_duplicate_groups, prototype_scores
    from stages.score_cache import ScoreCache, scoring_key

    sc = config.score
    method = sc.method
    if method == "none":
        raise ValueError("score_decoded called with score.method=none")
    if decoded.images is None:
        raise ValueError("scoring needs the decoded pixels (decode with keep_images=True)")
    frame = decoded.frame.reset_index(drop=True).copy()
    images: np.ndarray = decoded.images
    labels = frame["label"].to_numpy(dtype=np.int64)
    label_free = method == "prototype"
    num_classes = max(len(decoded.classes), int(labels.max()) + 1 if len(labels) else 1)
    if not label_free and (labels < 0).any():
        raise UserInputError(
            f"score.method={method} needs labels, but {int((labels < 0).sum())} image(s) have none "
            "(files directly under the root); use --score prototype for unlabeled data"
        )
    seconds: dict[str, float] = {}
    task = "rotation" if label_free else "labels"
    spec = ProxySpec.from_config(sc, num_classes, task)
    key = scoring_key(config, decoded.classes, task)
    cache_url = sc.cache_url or _join(config.output, "score_cache")
    cache = ScoreCache(cache_url, key, config.data.storage_options) if sc.cache else None

    start = time.perf_counter()
    hits = cache.lookup(frame["sha256"], labels) if cache else pd.DataFrame()
    if len(hits):
        pairs = set(zip(hits["sha256"], hits["label"].astype(np.int64), strict=True))
        hit_mask = pd.Series([(s, int(y)) in pairs for s, y in zip(frame["sha256"], labels, strict=True)])
    else:
        hit_mask = pd.Series(False, index=frame.index)
    miss_rows = np.flatnonzero(~hit_mask.to_numpy())
    seconds["cache_lookup"] = time.perf_counter() - start
    log.info("score cache %s: %d hits, %d misses", cache_url, int(hit_mask.sum()), len(miss_rows))

    new = pd.DataFrame(index=miss_rows)
    losses: list[list[float]] = []
    # Label-free with an encoder: the prototype distances need no proxies (no rotation EL2N columns then).
    proxies = not (label_free and sc.encoder is not None)
    if len(miss_rows):
        models = cache.load_models() if cache else None
        start = time.perf_counter()
        if not proxies:
            models = models or {"states": [], "centroids": None}
            states, forgetting = [], np.full(len(frame), np.nan)
        elif models is None:
            seeds = [sc.seed + k for k in range(sc.num_models)]
            results = train_proxies(images, labels, spec, seeds, sc.cpus_per_model, progress)
            states = [r.state for r in results]
            forgetting = np.mean([r.forgetting for r in results], axis=0)
            losses = [r.losses for r in results]
            models = {"states": states, "centroids": None}
        else:
            log.info("reusing %d cached proxies; new images get no forgetting count", len(models["states"]))
            states = models["states"]
            forgetting = np.full(len(frame), np.nan)
        seconds["train"] = time.perf_counter() - start

        start = time.perf_counter()
        cols = (
            score_rows(
                miss_rows,
                images,
                None if label_free else labels,
                states,
                spec,
                sc,
                embed=label_free and sc.encoder is None,
                progress=progress,
            )
            if proxies
            else {}
        )
        seconds["score"] = time.perf_counter() - start
        for name in ("el2n", "el2n_std", "grand"):
            new[name] = cols.get(name, np.full(len(miss_rows), np.nan))
        new["forgetting"] = np.nan if label_free else forgetting[miss_rows]
        new["prototype"] = np.nan
        if label_free:
            start = time.perf_counter()
            if sc.encoder is not None:
                from stages.embed import encoder_embeddings

                embedding = encoder_embeddings(sc.encoder, images[miss_rows], config.data.storage_options)
            else:
                embedding = cols["embedding"]
            distances, centroids = prototype_scores(embedding, sc.num_clusters, sc.seed, models["centroids"])
            models["centroids"] = centroids
            new["prototype"] = distances
            seconds["prototype"] = time.perf_counter() - start
        if cache:
            new_rows = new.assign(sha256=frame["sha256"].to_numpy()[miss_rows], label=labels[miss_rows])
            cache.store(new_rows, models)

    columns = ["el2n", "el2n_std", "grand", "forgetting", "prototype"]
    for name in columns:
        frame[name] = np.nan
    if len(hits):  # match on (sha256, label): the same bytes under two labels are two examples
        found = frame[["sha256", "label"]].merge(
            hits.drop_duplicates(["sha256", "label"], keep="last"), on=["sha256", "label"], how="left"
        )
        for name in columns:
            frame.loc[hit_mask.to_numpy(), name] = found.loc[hit_mask.to_numpy(), name].to_numpy()
    for name in columns:
        if name in new:
            frame.loc[miss_rows, name] = new[name].to_numpy(dtype=np.float64)

    start = time.perf_counter()
    frame["duplicate_group"] = near_duplicate_groups(images, sc.duplicate_threshold)
    seconds["duplicates"] = time.perf_counter() - start
    frame["score"] = frame[method].astype(np.float64)
    return ScoreOutcome(
        frame=frame,
        scored=len(miss_rows),
        cached=int(hit_mask.sum()),
        seconds=seconds,
        losses=losses,
    )


def _join(url: str, name: str) -> str:
    from pipeline.core.storage import join

    return join(url, name)
