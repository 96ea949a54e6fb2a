"""MAE pretraining on Ray Train, streamed from object storage.

    maskdiet pretrain --manifest s3://bucket/curated/manifest.parquet --output s3://bucket/pretrain
    maskdiet pretrain --manifest out/manifest.parquet --output out/pretrain --set pretrain.num_workers=2

This module is the driver's side. `build_trainer` reads the manifest's kept rows, holds out
`pretrain.val_images` of them (decoded once, shipped to the workers), and hands the rest to a `TorchTrainer`
as a streamed Ray Dataset (`stages.stream`), or, when their decoded images fit `pretrain.cache_decoded_mib`,
decodes them once into the object store for the workers to take their batches from
(`stages.stream.cached_batches`). Each worker runs `pipeline.train_loop.train_loop`:

    load checkpoint → while step < steps: train_step → every eval_every: validate, report (+ checkpoint)

- AdamW (0.9, 0.95), weight decay 0.05 (not on biases, norms, tokens), lr = base_lr × global_batch / 256
  with warmup + cosine/linear/constant; gradient clipping; bf16 autocast on GPU only; DDP via
  `prepare_model`; `torch.compile` per `pretrain.compile` (GPU workers by default); random resized crop and
  flip on the worker's device (`pipeline.models.augment`).
- `PretrainResult.first_step_seconds`: from the `pretrain` call to the first step done.
- `ray.train.report` every `eval_every` steps with `step`, `loss`, `recon_loss`, `lr`, `mask_ratio`,
  `images_per_s`, `val_loss` (masked-reconstruction loss on the held-out images under a fixed random mask:
  the number Tune sweeps minimise); a checkpoint (model, optimizer, step, config, metrics so far) every
  `checkpoint_every` steps and at the end. Rerunning the same run name under the same output resumes from
  the latest checkpoint; `FailureConfig(max_failures)` restarts failed workers from it. From the decoded
  cache a resumed run goes on with the batch after the checkpoint's; streamed from storage it starts the
  data order over (skipping ahead would mean reading again every image already trained on).
- Rank 0 writes `<output>/metrics.jsonl` (one line per `log_every` steps and at each report) and, at the end,
  `<output>/encoder.pth` (timm ViT keys; see `pipeline.models.mae`).
- A non-finite loss stops every worker at the same step with a message; `pretrain` raises `TrainingDiverged`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.core.config import Config
from pipeline.core.errors import MaskdietError
from pipeline.core.runtime import cluster_cpus
from pipeline.core.storage import join, ray_storage, read_json_lines
from pipeline.core.trainer import Trainer
from pipeline.models.mae import size_of
from pipeline.train_loop import ENCODER_NAME, METRICS_NAME, train_loop

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class TrainingDiverged(MaskdietError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and what to try."""


@dataclass
class PretrainResult:
    """What a pretraining run produced. Losses are the masked-reconstruction loss (mean over workers)."""

    run_name: str
    steps: int  # steps completed
    first_loss: float
    final_loss: float
    val_loss: float | None  # last held-out loss (None with pretrain.val_images=0)
    images_per_s: float  # training throughput over the run (all workers), warm-up step excluded
    seconds: float  # wall time of fit()
    encoder_url: str
    metrics_url: str
    checkpoint: str | None  # path of the latest checkpoint in its storage
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl lines
    # from the `pretrain` call to the first training step done (Ray, the worker group, data warm-up and, when
    # compiled, the compile); None when no step ran
    first_step_seconds: float | None = None


# ---------------------------------------------------------------------------------------------- driver


def worker_resources(config: Config) -> dict[str, float]:
    """Resources per Train worker: `pretrain.cpus_per_worker`, else the cluster's CPUs less the share left to
    Ray Data (`ray.data_cpu_share`), split over the workers (e.g. 2 CPUs, share 0.5, 2 workers → 0.5 each)."""
    pre = config.pretrain
    if pre.cpus_per_worker is not None:
        cpus = pre.cpus_per_worker
    else:
        total = cluster_cpus()
        cpus = max(0.1, math.floor(100 * total * (1.0 - config.ray.data_cpu_share) / pre.num_workers) / 100)
    resources = {"CPU": cpus}
    if pre.use_gpu:
        resources["GPU"] = pre.gpus_per_worker
    return resources


def torch_threads(config: Config, resources: dict[str, float]) -> int:
    """Intra-op threads of each worker's torch: `pretrain.threads`, else the worker's CPUs plus its part of
    Ray Data's share (`ray.data_cpu_share`), rounded. Ray's CPUs are a scheduling reservation, not a cap:
    streaming small images leaves most of Ray Data's share idle, and a CPU-trained model that may use it runs
    about 1.9× faster on 2 cores than one held to its reserved single core (measured on the demo's MAE)."""
    pre = config.pretrain
    if pre.threads is not None:
        return pre.threads
    return max(1, round(resources["CPU"] / (1.0 - config.ray.data_cpu_share)))


def _validation_images(config: Config, paths: list[str]) -> np.ndarray:
    """The held-out images, decoded once; any that no longer decode are left out with a warning."""
    from stages.stream import decode_flagged

    images, ok, reasons = decode_flagged(paths, config)
    if reasons:
        path, reason = next(iter(reasons.items()))
        log.warning("%d validation image(s) left out: %s (%s)", len(reasons), path, reason)
    return images[ok]


def build_trainer(
    config: Config,
    manifest_url: str,
    output: str,
    *,
    run_name: str = "pretrain",
    callbacks: list | None = None,
) -> TorchTrainer:
    """A `TorchTrainer` that pretrains an MAE on the manifest's kept images (needs a running Ray).

    Checkpoints go to `<output>/checkpoints/<run_name>` (a rerun with the same name resumes); `callbacks`
    (e.g. Tune's `TuneReportCallback`) are appended to `RunConfig.callbacks`.
    """
    from stages.stream import (
        decode_cache,
        epochs_needed,
        fits_cache,
        load_kept,
        split_validation,
        training_dataset,
    )

    size_of(config)  # a bad model setting fails here, not in every worker
    pre = config.pretrain
    so = config.data.storage_options
    kept = load_kept(manifest_url, so)
    train, val = split_validation(kept, pre.val_images, pre.seed)
    if len(train) < pre.batch_size * pre.num_workers:
        log.warning(
            "only %d training images for a global batch of %d: each step repeats images",
            len(train),
            pre.batch_size * pre.num_workers,
        )
    global_batch = pre.batch_size * pre.num_workers
    epochs = epochs_needed(len(train), pre.steps, global_batch)
    # A small set is decoded once and read by the workers from the object store; a large one streams.
    cache = decode_cache(train, config) if fits_cache(len(train), config) else None
    datasets = {"train": training_dataset(train, config, epochs, pre.seed)} if cache is None else {}
    val_ref = ray.put(_validation_images(config, val["path"].astype(str).tolist()))
    resources = worker_resources(config)
    log.info(
        "pretrain %s: %d train / %d val images, %d epochs %s, %d workers × %s, global batch %d, lr %.2e",
        pre.model,
        len(train),
        len(val),
        epochs,
        "streamed from storage" if cache is None else "from the decoded cache",
        pre.num_workers,
        resources,
        global_batch,
        pre.base_lr * global_batch / 256,
    )
    storage_path, storage_fs = ray_storage(join(output, "checkpoints"), so)
    loop_config = {
        "config": config.model_dump(mode="json"),
        "output": output,
        "val": val_ref,
        "cache": cache,
        "epochs": epochs,
        "num_train": len(train),
        "threads": torch_threads(config, resources),
    }
    return Trainer(
        train_loop,
        state_api=config.ray.state_api,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=pre.num_workers, use_gpu=pre.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=pre.num_to_keep),
            failure_config=FailureConfig(max_failures=pre.max_failures),
            callbacks=list(callbacks or []),
            logging_config=LoggingConfig(log_level=config.ray.train_log_level),
        ),
        datasets=datasets,
    )


def pretrain(
    config: Config,
    manifest_url: str,
    output: str,
    *,
    run_name: str = "pretrain",
    progress: Progress | None = None,
    on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
) -> PretrainResult:
    """Pretrain per `config` on the manifest's kept images; write `<output>/encoder.pth`, metrics and
    checkpoints. `progress("pretrain", step, steps)` is called as metrics arrive (every eval interval), and
    `on_metrics(lines)` with all metrics.jsonl lines so far (e.g. `Tracker.log_metrics`), last after fit."""
    called = time.time()  # wall clock: the workers stamp their first step with theirs
    so = config.data.storage_options
    metrics_url = join(output, METRICS_NAME)
    trainer = build_trainer(config, manifest_url, output, run_name=run_name)
    start = time.perf_counter()
    listeners = [on_metrics] if on_metrics else []
    if progress:
        listeners.append(lambda lines: progress("pretrain", int(lines[-1]["step"]), config.pretrain.steps))
    with _watch_metrics(metrics_url, so, listeners):
        result = trainer.fit()
    seconds = time.perf_counter() - start
    final = result.metrics or {}
    history = read_json_lines(metrics_url, so)
    if on_metrics and history:
        on_metrics(history)
    stopped = final.get("stopped") or (history[-1].get("stopped") if history else None)
    if stopped:
        raise TrainingDiverged(str(stopped))
    if progress:
        progress("pretrain", int(final.get("step", 0)), config.pretrain.steps)
    return PretrainResult(
        run_name=run_name,
        steps=int(final.get("step", history[-1]["step"] if history else 0)),
        first_loss=float(history[0]["loss"]) if history else math.nan,
        final_loss=float(final.get("loss", history[-1]["loss"] if history else math.nan)),
        val_loss=final.get("val_loss"),
        images_per_s=training_throughput(history),
        seconds=seconds,
        encoder_url=join(output, ENCODER_NAME),
        metrics_url=metrics_url,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        history=history,
        first_step_seconds=first_step_seconds(history, called),
    )


def first_step_seconds(history: list[dict[str, Any]], called: float) -> float | None:
    """Seconds from `called` (wall clock) to the first step of this call's workers: the earliest
    `first_step_time` in the metrics lines that is not older than `called` (lines of an earlier call of a
    resumed run are). None when no line of this call has one."""
    stamps = [h["first_step_time"] for h in history if h.get("first_step_time", -math.inf) >= called]
    return min(stamps) - called if stamps else None


@contextlib.contextmanager
def _watch_metrics(
    metrics_url: str, storage_options: dict[str, Any], listeners: list[Callable[[list[dict[str, Any]]], None]]
) -> Iterator[None]:
    """While the block runs, call each listener every 2 s with metrics.jsonl's lines when there are new
    ones: Train's own results reach the driver only at the end of `fit()`."""
    if not listeners:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        seen = 0
        while not stop.wait(2.0):
            try:
                lines = read_json_lines(metrics_url, storage_options)
            except Exception:  # a half-listed object store must not kill the watcher
                continue
            if len(lines) == seen:
                continue
            seen = len(lines)
            for listener in listeners:
                try:
                    listener(lines)
                except Exception as error:  # a tracking server hiccup must not stop the training
                    log.warning("metrics listener failed: %s", error)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def training_throughput(history: list[dict[str, Any]]) -> float:
    """Images per second over the run from its metrics lines (0.0 when none was timed): total images over
    total time. Lines cover different numbers of steps (log_every, or fewer up to a report) of one global
    batch each, so a line's time is its steps over its rate, and the run's rate is the steps-weighted
    harmonic mean of the lines' rates (an arithmetic mean would overstate it when rates differ)."""
    steps_covered = np.diff([0] + [int(h["step"]) for h in history])
    timed = [
        (h["images_per_s"], n) for h, n in zip(history, steps_covered, strict=True) if h.get("images_per_s")
    ]
    if not timed:
        return 0.0
    return float(sum(n for _, n in timed) / sum(n / rate for rate, n in timed))
