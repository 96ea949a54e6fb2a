"""Score stage: how hard is each labeled example? EL2N, GraNd and forgetting from K briefly trained proxies.

The method is "Deep Learning on a Data Diet" (Paul, Ganguli, Dziugaite, 2021). K small classifiers
(`pipeline.models.proxy`, different seeds) train for a few epochs on the decoded images — one Ray task each,
or with `score.trainer=train` one Ray Train job each that checkpoints every epoch (`stages.proxy_jobs`),
streaming the pixels window by window from the object store (`stages.pixels`: no process holds them all)
— then every example is scored by the map stage `ScoreModels`, run by Ray Data tasks on the same, already
warm workers (or, with `score.compute=actors`, an actor pool that loads the K models once per actor). With
`score.use_gpu` the proxy tasks and the scorers each take `score.gpus_per_model` of a GPU and run in bf16.
Higher is harder for every score:

- `el2n`: E_k ‖softmax(f_k(x)) − onehot(y)‖₂ (L2 norm, not squared), eval mode, no augmentation;
  0 ≤ el2n ≤ √2, and a uniform prediction gives √(1 − 1/C). `el2n_std` is the std over the K models.
- `grand`: E_k ‖∇_θ ℓ(f_k(x), y)‖. `last-layer` (default) uses the exact closed form for the linear head
  on features h: ‖∇_{W,b} ℓ‖ = ‖p − y‖ · √(1 + ‖h‖²); `full` differentiates every weight per example
  (torch.func; fine for the small CNN, slow for big models).
- `forgetting` (Toneva et al. 2019): mean over the K models of the number of correct → incorrect
  transitions seen while training; an example never classified correctly counts `epochs` (more than any
  learned example can reach), as "unforgettable" examples count 0.
- `prototype` (label-free): the proxies learn which of 4 rotations was applied, and only their embeddings
  are used: the distance to the nearest k-means prototype (see `stages/embed.py`).

`score.method` picks a `Scorer` from `SCORERS` by name. The three labeled methods compute the same columns
(one proxy training gives all three; the cache keeps them together) and differ only in which becomes
`score`. `score_images` composes it with the score cache (`stages/score_cache.py`): only cache misses are
scored; proxies trained by an earlier run with the same scoring config are reused. `ScoreStage` is the
whole of it as an all-to-all stage.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
import torch
import torch.nn.functional as F

from pipeline.core.config import Config, ScoreConfig
from pipeline.core.errors import UserInputError
from pipeline.core.runtime import cluster_cpus, cluster_gpus
from pipeline.core.storage import join
from pipeline.models.proxy import ProxyNet, ProxyResult, ProxySpec, to_input, train_proxy
from stages.base import ALL_TO_ALL, Batch, Progress, Resources, Stage, map_batches
from stages.embed import Device, encoder_embeddings, prototype_scores
from stages.pixels import ChunkWindows, PixelChunks
from stages.proxy_jobs import ProxyJobs, rows_digest, submit_proxy_jobs
from stages.score_cache import CacheHits, ScoreCache, scoring_key

log = logging.getLogger(__name__)

# The score columns every scoring run fills (NaN where its method computes none), in manifest order.
SCORE_COLUMNS = ("el2n", "el2n_std", "grand", "forgetting", "prototype")


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
    sq = sum(g.reshape(len(x), -1).float().pow(2).sum(1) for g in grads.values())
    return sq.sqrt().cpu().numpy()


# ---------------------------------------------------------------------------------------------- map stage


class ScoreModels(Stage):
    """Map stage: the K proxies' scores for rows given by index.

    Input column: `row` (int64 indices into the pixels and labels the stage holds). Output columns: `row`;
    `el2n`, `el2n_std`, `grand` when it has labels; `embedding` (N, K·D), the L2-normalised features of each
    proxy concatenated, when `embed`. The pixels stay in the object store; each call reads the stored batches
    holding the rows it scores; the labels and weights arrive as object-store references, read once per task or actor
    (`setup`). Each call scores `batch_size` rows at a time (all at once when None), on `spec.device`.
    """

    name = "score-rows"
    inputs = ("row",)
    passthrough = False

    def __init__(
        self,
        states: list[dict[str, torch.Tensor]] | ray.ObjectRef,
        spec: ProxySpec,
        pixels: PixelChunks,
        labels: np.ndarray | ray.ObjectRef | None,
        grand: str = "last-layer",
        embed: bool = False,
        threads: int = 1,
        batch_size: int | None = None,
        resources: Resources = Resources(),
    ) -> None:
        self.states, self.spec, self.pixels, self.labels = states, spec, pixels, labels
        self.grand, self.embed, self.threads, self.batch_size = grand, embed, threads, batch_size
        self.resources = resources
        labeled = ("el2n", "el2n_std", "grand") if labels is not None else ()
        self.outputs = ("row", *labeled, *(("embedding",) if embed else ()))
        self.models: list[ProxyNet] = []

    def setup(self) -> None:
        # Ray Data passes the stage as built: resolve object-store references once per task or actor
        # (numpy arrays come back zero-copy from shared memory).
        self.states, self.labels = (
            ray.get(v) if isinstance(v, ray.ObjectRef) else v for v in (self.states, self.labels)
        )
        self.models = []
        for state in self.states:
            model = self.spec.build()
            model.load_state_dict(state)
            self.models.append(model.to(self.spec.device).eval())

    def process(self, batch: Batch) -> Batch:
        torch.set_num_threads(self.threads)
        rows = np.asarray(batch["row"], dtype=np.int64)
        step = self.batch_size or max(len(rows), 1)
        parts = [self._score(rows[i : i + step]) for i in range(0, max(len(rows), 1), step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @torch.inference_mode()
    def _forward(self, model: ProxyNet, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with self.spec.autocast():
            h = model.features(x)
            logits = model.head(h)
        return F.softmax(logits.float(), dim=1).cpu().numpy(), h.float().cpu().numpy()

    def _score(self, rows: np.ndarray) -> Batch:
        x = to_input(self.pixels.take(rows)).to(self.spec.device, non_blocking=True)
        out: Batch = {"row": rows}
        per_el2n, per_grand, embeddings = [], [], []
        for model in self.models:
            probs, h = self._forward(model, x)
            if self.labels is not None:
                y = self.labels[rows]
                per_el2n.append(el2n(probs, y))
                if self.grand == "full":
                    per_grand.append(grand_full(model, x, torch.from_numpy(y).to(x.device)))
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


def gpus_per_model(config: ScoreConfig) -> float:
    """The GPU share of each proxy task and scorer: `score.gpus_per_model` with `score.use_gpu`, else 0.
    Fails before any work when the cluster has no GPU (Ray would wait for one forever)."""
    if not config.gpu_share:
        return 0.0
    if cluster_gpus() <= 0:
        raise UserInputError(
            "score.use_gpu=true, but this Ray cluster has no GPU: "
            "set score.use_gpu=false (or --set score.use_gpu=false) or connect to a cluster with GPUs"
        )
    return config.gpu_share


def score_rows(
    rows: np.ndarray,
    pixels: PixelChunks,
    labels: np.ndarray | None,
    states: list[dict[str, torch.Tensor]],
    spec: ProxySpec,
    config: ScoreConfig,
    embed: bool = False,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Score `rows` (indices into pixels/labels) with the K proxies: `ScoreModels` over Ray Data, as tasks
    or an actor pool (`score.compute`). Returns its columns, in `rows` order.

    Tasks, the default: building the K small proxies takes milliseconds, while an actor pool starts a fresh
    process per actor on every run (torch's import and the models: seconds, measured about 6–10 s on
    2 CPUs); tasks run on Ray's already-started workers, warm from proxy training.
    """
    if len(rows) == 0:
        return {"row": np.zeros(0, dtype=np.int64)}
    # The blocks are made on the driver: no upstream Ray Data task has to compete with the scorers for
    # CPUs (a repartition here deadlocked once an actor pool held every CPU), and each block is one call
    # (`batch_size=None`), not a batch spliced from two blocks.
    rows = np.asarray(rows, dtype=np.int64)
    by_source = pixels.by_source(rows)  # a block's rows then come from few stored batches
    step = rows_per_block(config, len(rows))
    ds = ray.data.from_numpy([by_source[i : i + step] for i in range(0, len(rows), step)])
    ds = ds.rename_columns({"data": "row"})
    # On a small cluster Ray Data's per-operator reservation held the scoring tasks to one at a time for the
    # first second (2 CPUs, measured); `runtime.configure_data_context`'s size profile turns it off there.
    actors = scoring_actors(config, len(rows)) if config.compute == "actors" else None
    stage = ScoreModels(
        states=ray.put(states),
        spec=spec,
        pixels=pixels,
        labels=None if labels is None else ray.put(np.asarray(labels, dtype=np.int64)),
        grand=config.grand,
        embed=embed,
        batch_size=config.score_batch_size,
        resources=Resources(cpus=1, gpus=gpus_per_model(config), actors=actors),
    )
    parts: list[dict[str, np.ndarray]] = []
    done = 0
    for batch in map_batches(ds, stage, batch_size=None).iter_batches(batch_size=None, batch_format="numpy"):
        parts.append(batch)
        done += len(batch["row"])
        if progress:
            progress("score", done, len(rows))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = positions(merged["row"], rows)
    return {k: v[order] for k, v in merged.items()}


def positions(seen: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of `wanted` is in `seen` (the same distinct row ids, in another order): `seen[result]`
    equals `wanted`. Sorted search, not a dict of millions of Python ints."""
    by_value = np.argsort(seen, kind="stable")
    return by_value[np.searchsorted(seen, np.asarray(wanted, dtype=np.int64), sorter=by_value)]


# ---------------------------------------------------------------------------------------------- proxies


def train_proxies(
    pixels: PixelChunks,
    labels: np.ndarray,
    spec: ProxySpec,
    seeds: list[int],
    config: ScoreConfig,
    progress: Progress | None = None,
    jobs: ProxyJobs | None = None,
) -> list[ProxyResult]:
    """Train one proxy per seed, all in parallel (`score.cpus_per_model` CPUs and, with `score.use_gpu`,
    `score.gpus_per_model` of a GPU each), each streaming the pixels window by window: as Ray tasks, or,
    given `jobs` (`score.trainer=train`), as Ray Train jobs that checkpoint every epoch
    (`stages.proxy_jobs`)."""
    windows = ChunkWindows(pixels, config.window_chunks)
    labels_ref = ray.put(np.asarray(labels, dtype=np.int64))
    gpus = gpus_per_model(config)
    if jobs is not None:
        resources = {"CPU": config.cpus_per_model, **({"GPU": gpus} if gpus else {})}
        pending = submit_proxy_jobs(windows, labels_ref, spec, seeds, resources, jobs)
    else:
        task = ray.remote(num_cpus=config.cpus_per_model, num_gpus=gpus)(train_proxy)
        pending = [task.remote(windows, labels_ref, spec, seed) for seed in seeds]
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
        resumed = f" (went on after epoch {r.resumed_from} of a stopped run)" if r.resumed_from else ""
        log.info("proxy seed %d: loss %.3f → %.3f%s", r.seed, r.losses[0], r.losses[-1], resumed)
    return out


@dataclass(frozen=True)
class ScoringInputs:
    """What every scoring step reads."""

    pixels: PixelChunks  # N images (S, S, 3) uint8, in the object store
    labels: np.ndarray  # (N,) int64, −1 where unlabeled
    spec: ProxySpec  # the proxies' model, task and training settings
    config: ScoreConfig
    storage_options: dict[str, Any]  # for `score.encoder`
    progress: Progress | None = None
    jobs: ProxyJobs | None = None  # score.trainer=train: where the proxies' Train jobs checkpoint


@dataclass
class Proxies:
    """The K proxies that score this run's new images: trained now, or taken from the score cache."""

    states: list[dict[str, torch.Tensor]]
    forgetting: np.ndarray  # (N,) mean forgetting events per image; NaN unless trained on labels this run
    losses: list[list[float]]  # per proxy trained this run: mean loss per epoch
    centroids: np.ndarray | None = None  # (k, D) prototypes of the prototype score, cached with the proxies

    def models(self) -> dict[str, Any]:
        """What the score cache keeps (`ScoreCache.save_models`)."""
        return {"states": self.states, "centroids": self.centroids}


def obtain_proxies(inputs: ScoringInputs, cached: dict[str, Any] | None, needed: bool) -> Proxies:
    """The cached proxies when the scoring key has them (so old and new images are scored by the same
    models), else K new ones trained on every image (forgetting needs each image's whole training history),
    or none when the scorer needs none."""
    no_forgetting = np.full(len(inputs.pixels), np.nan)
    if cached is not None:
        if needed:
            log.info("reusing %d cached proxies; new images get no forgetting count", len(cached["states"]))
        return Proxies(cached["states"], no_forgetting, [], cached["centroids"])
    if not needed:
        return Proxies([], no_forgetting, [])
    sc = inputs.config
    seeds = [sc.seed + k for k in range(sc.num_models)]
    results = train_proxies(
        inputs.pixels, inputs.labels, inputs.spec, seeds, sc, inputs.progress, inputs.jobs
    )
    forgetting = np.mean([r.forgetting for r in results], axis=0)
    return Proxies([r.state for r in results], forgetting, [r.losses for r in results])


# ---------------------------------------------------------------------------------------------- scorers

Columns = dict[str, np.ndarray]  # SCORE_COLUMNS → (M,) float, one entry per scored row


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Record the wall time of the `with` block as `seconds[phase]`."""
    start = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - start


def labeled_columns(
    inputs: ScoringInputs, rows: np.ndarray, proxies: Proxies, seconds: dict[str, float]
) -> Columns:
    """EL2N, its std and GraNd from the proxies' predictions on `rows`; forgetting from their training."""
    with timed(seconds, "score"):
        cols = score_rows(
            rows,
            inputs.pixels,
            inputs.labels,
            proxies.states,
            inputs.spec,
            inputs.config,
            progress=inputs.progress,
        )
    return {
        "el2n": cols["el2n"],
        "el2n_std": cols["el2n_std"],
        "grand": cols["grand"],
        "forgetting": proxies.forgetting[rows],
        "prototype": np.full(len(rows), np.nan),
    }


def prototype_columns(
    inputs: ScoringInputs, rows: np.ndarray, proxies: Proxies, seconds: dict[str, float]
) -> Columns:
    """Label-free: each row's distance to its nearest k-means prototype, over the embeddings of a maskdiet
    encoder (`score.encoder`) or else of the rotation proxies. Prototypes from the cache are reused (new
    images are measured against the old prototypes); new ones are stored in `proxies.centroids`, which the
    cache keeps with the proxies."""
    sc = inputs.config
    with timed(seconds, "score"):
        cols = (
            score_rows(rows, inputs.pixels, None, proxies.states, inputs.spec, sc, True, inputs.progress)
            if sc.encoder is None
            else {}
        )
    with timed(seconds, "prototype"):
        if sc.encoder is not None:
            embedding = encoder_embeddings_of(sc.encoder, inputs.pixels, rows, inputs.storage_options)
        else:
            embedding = cols["embedding"]
        distances, proxies.centroids = Device(gpus_per_model(sc)).run(
            prototype_scores, embedding, sc.num_clusters, sc.seed, proxies.centroids
        )
    unscored = np.full(len(rows), np.nan)
    return {
        "el2n": unscored,
        "el2n_std": unscored,
        "grand": unscored,
        "forgetting": unscored,
        "prototype": distances,
    }


def encoder_embeddings_of(
    url: str, pixels: PixelChunks, rows: np.ndarray, storage_options: dict[str, Any]
) -> np.ndarray:
    """`stages.embed.encoder_embeddings` of `rows`, read one stored batch at a time: (len(rows), D) in rows'
    order."""
    parts = list(pixels.iter_rows(rows))
    embedding = encoder_embeddings(url, (images for _, images in parts), storage_options)
    seen = np.concatenate([r for r, _ in parts]) if parts else np.zeros(0, dtype=np.int64)
    return embedding[positions(seen, rows)]


@dataclass(frozen=True)
class Scorer:
    """How one `score.method` scores."""

    column: str  # the column that becomes `score`
    task: str  # what the proxies learn: "labels" (the given classes) or "rotation" (label-free)
    needs_labels: bool
    needs_proxies: Callable[[ScoreConfig], bool]  # False: the scores come from elsewhere (an encoder)
    columns: Callable[[ScoringInputs, np.ndarray, Proxies, dict[str, float]], Columns]


def _labeled(column: str) -> Scorer:
    return Scorer(column, "labels", needs_labels=True, needs_proxies=lambda sc: True, columns=labeled_columns)


SCORERS: dict[str, Scorer] = {
    "el2n": _labeled("el2n"),
    "grand": _labeled("grand"),
    "forgetting": _labeled("forgetting"),
    "prototype": Scorer(
        "prototype",
        "rotation",
        needs_labels=False,
        needs_proxies=lambda sc: sc.encoder is None,  # with an encoder no proxy is trained
        columns=prototype_columns,
    ),
}


def scorer_for(method: str) -> Scorer:
    """The scorer `score.method` names. `none` has none: a run that scores nothing composes no score stage."""
    if method == "none":
        raise ValueError("score.method=none scores nothing: compose `Unscored` instead of a score stage")
    if method not in SCORERS:
        raise UserInputError(f"unknown score.method {method!r}; expected one of {', '.join(SCORERS)} or none")
    return SCORERS[method]


# ---------------------------------------------------------------------------------------------- cache


def cache_url(config: Config) -> str:
    """`score.cache_url`, else <output>/score_cache."""
    return config.score.cache_url or join(config.output, "score_cache")


def open_cache(config: Config, classes: list[str], task: str) -> ScoreCache | None:
    """The cache of this scoring key (None with `score.cache=false`)."""
    if not config.score.cache:
        return None
    return ScoreCache(cache_url(config), scoring_key(config, classes, task), config.data.storage_options)


def proxy_jobs(config: Config, classes: list[str], task: str, keys: pd.DataFrame) -> ProxyJobs | None:
    """With `score.trainer=train`: the proxy jobs' checkpoints, in the score cache's folder for this scoring
    key (also with `score.cache=false`: they are how a killed run resumes), one run per proxy and rows."""
    sc = config.score
    if sc.trainer != "train":
        return None
    return ProxyJobs(
        storage=join(cache_url(config), scoring_key(config, classes, task), "proxy_jobs"),
        rows=rows_digest(keys),
        max_failures=sc.max_failures,
        state_api=config.ray.state_api,
        storage_options=config.data.storage_options,
    )


def split_by_cache(cache: ScoreCache | None, sha256: pd.Series, labels: np.ndarray) -> CacheHits:
    """Which rows the score cache already has, matched on (sha256, label): the same bytes under two labels
    are two examples. Row for row with the input, so hits and misses are taken by a mask (`found`), never
    by a merge on keys, as a run holds millions of rows at scale."""
    return cache.lookup(sha256, labels) if cache else CacheHits.none(len(labels))


def merge_scores(hits: CacheHits, new: pd.DataFrame | None) -> pd.DataFrame:
    """SCORE_COLUMNS for every row (index 0..N−1): cached values for hits, this run's `new` (indexed by the
    miss rows) for misses. The result takes over `hits`' arrays and writes the misses into them: at
    millions of rows a copy would cost 40 bytes a row, and the lookup's result has no other use."""
    out = pd.DataFrame({name: hits.scores[name] for name in SCORE_COLUMNS}, copy=False)
    if new is not None:
        misses = np.flatnonzero(~hits.found)
        for name in SCORE_COLUMNS:
            out.loc[misses, name] = new[name].to_numpy(dtype=np.float64)
    return out


# ---------------------------------------------------------------------------------------------- compose


@dataclass
class ScoreOutcome:
    """The score columns, one row per input row in its order (higher = harder; NaN = not computed), and
    how much work the cache saved."""

    columns: pd.DataFrame  # SCORE_COLUMNS + `score`, the column `score.method` names
    scored: int  # examples scored this run (cache misses)
    cached: int  # examples whose scores came from the cache
    seconds: dict[str, float] = field(default_factory=dict)  # a timer per phase
    losses: list[list[float]] = field(default_factory=list)  # per proxy trained this run: loss per epoch


def score_misses(
    scorer: Scorer,
    inputs: ScoringInputs,
    misses: np.ndarray,
    cached_models: dict[str, Any] | None,
    seconds: dict[str, float],
) -> tuple[pd.DataFrame, Proxies]:
    """The rows `misses` scored: their SCORE_COLUMNS (indexed by row), and the proxies that scored them."""
    with timed(seconds, "train"):
        proxies = obtain_proxies(inputs, cached_models, scorer.needs_proxies(inputs.config))
    return pd.DataFrame(scorer.columns(inputs, misses, proxies, seconds), index=misses), proxies


def require_labels(labels: np.ndarray, method: str) -> None:
    unlabeled = int((labels < 0).sum())
    if unlabeled:
        raise UserInputError(
            f"score.method={method} needs labels, but {unlabeled} image(s) have none "
            "(files directly under the root); use --score prototype for unlabeled data"
        )


def score_images(
    frame: pd.DataFrame,
    images: PixelChunks | np.ndarray,
    classes: list[str],
    config: Config,
    progress: Progress | None = None,
) -> ScoreOutcome:
    """Score every image per `config.score`; reuse cached scores and proxies where the scoring key matches.

    frame: `sha256` and `label` per image, row i ↔ image i of `images` (`PixelChunks` in the object store, or
    an (N, S, S, 3) uint8 array, which is put there). Only cache misses are scored; the new scores (and
    the proxies) go back into the cache.
    """
    sc = config.score
    pixels = images if isinstance(images, PixelChunks) else PixelChunks.from_array(images, sc.chunk_rows)
    scorer = scorer_for(sc.method)
    keys = frame[["sha256", "label"]].reset_index(drop=True)
    labels = keys["label"].to_numpy(dtype=np.int64)
    if scorer.needs_labels:
        require_labels(labels, sc.method)
    num_classes = max(len(classes), int(labels.max()) + 1 if len(labels) else 1)
    spec = ProxySpec.from_config(sc, num_classes, scorer.task, config.decode.image_size)
    cache = open_cache(config, classes, scorer.task)

    seconds: dict[str, float] = {}
    with timed(seconds, "cache_lookup"):
        hits = split_by_cache(cache, keys["sha256"], labels)
    misses, cached = np.flatnonzero(~hits.found), int(hits.found.sum())
    log.info("score cache %s: %d hits, %d misses", cache_url(config), cached, len(misses))

    new: pd.DataFrame | None = None
    losses: list[list[float]] = []
    if len(misses):
        jobs = proxy_jobs(config, classes, scorer.task, keys)
        inputs = ScoringInputs(pixels, labels, spec, sc, config.data.storage_options, progress, jobs)
        cached_models = cache.load_models() if cache else None
        new, proxies = score_misses(scorer, inputs, misses, cached_models, seconds)
        losses = proxies.losses
        if cache:  # the proxies too: the next run's new images are scored by the same models
            rows = new.assign(sha256=keys["sha256"].to_numpy()[misses], label=labels[misses])
            cache.store(rows, proxies.models())
    columns = merge_scores(hits, new)
    columns["score"] = columns[scorer.column].astype(np.float64)
    return ScoreOutcome(columns, scored=len(misses), cached=cached, seconds=seconds, losses=losses)


class ScoreStage(Stage):
    """All-to-all: a difficulty score for every image, per `score.method` (higher = harder).

    Global by nature: the K proxies train on every image before any image can be scored, and the prototype
    score clusters every embedding. The per-row part inside it runs in parallel as the map stage
    `ScoreModels` (see `score_rows`). After a call, `outcome` says what it cost (rows scored and found in the
    cache, seconds per phase, proxy losses).
    """

    name = "score"
    kind = ALL_TO_ALL
    inputs = ("sha256", "label", "pixels")
    outputs = (*SCORE_COLUMNS, "score")

    def __init__(self, config: Config, classes: list[str], progress: Progress | None = None) -> None:
        scorer_for(config.score.method)  # an unknown method fails when the chain is built
        self.config, self.classes, self.progress = config, classes, progress
        self.outcome: ScoreOutcome | None = None

    def process(self, batch: Batch) -> Batch:
        frame = pd.DataFrame({"sha256": batch["sha256"], "label": batch["label"]})
        self.outcome = score_images(frame, batch["pixels"], self.classes, self.config, self.progress)
        return {**batch, **{name: self.outcome.columns[name].to_numpy() for name in self.outputs}}


class Unscored(Stage):
    """Map: `score` = NaN (null in the manifest) on every row, for `score.method=none`."""

    name = "unscored"
    inputs = ("path",)
    outputs = ("score",)

    def process(self, batch: Batch) -> Batch:
        return {**batch, "score": np.full(len(batch["path"]), np.nan)}
