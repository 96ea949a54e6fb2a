"""MAE pretraining on Ray Train, streamed from object storage.

    maskdiet pretrain --manifest s3://bucket/curated/manifest.parquet --output s3://bucket/pretrain
    maskdiet pretrain --manifest out/manifest.parquet --output out/pretrain --set pretrain.num_workers=2

The driver (`build_trainer`) reads the manifest's kept rows, holds out `pretrain.val_images` of them
(decoded once, shipped to the workers), and hands the rest to a `TorchTrainer` as a streamed Ray Dataset
(`stages.stream`), or, when their decoded images fit `pretrain.cache_decoded_mib`, decodes them once into
the object store for the workers to take their batches from (`stages.stream.cached_batches`). Each worker
runs `train_loop`:

    load checkpoint → while step < steps: train_step → every eval_every: validate, report (+ checkpoint)

- AdamW (0.9, 0.95), weight decay 0.05 (not on biases, norms, tokens), lr = base_lr × global_batch / 256
  with warmup + cosine/linear/constant; gradient clipping; bf16 autocast on GPU only; DDP via
  `prepare_model`.
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

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from pipeline.core.config import Config
from pipeline.core.errors import MaskdietError, UserInputError
from pipeline.core.storage import atomic_write_bytes, is_local, join, pyarrow_filesystem, url_to_fs
from pipeline.models.checkpoint import encoder_bytes, load_warm_start
from pipeline.models.mae import MaskedAutoencoder, normalize_images, size_of
from pipeline.models.masking import Masker
from pipeline.models.schedules import lr_at, mask_ratio_at

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)
ENCODER_NAME = "encoder.pth"
METRICS_NAME = "metrics.jsonl"
STATE_NAME = "state.pt"


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


# ---------------------------------------------------------------------------------------------- driver


def worker_resources(config: Config) -> dict[str, float]:
    """Resources per Train worker: `pretrain.cpus_per_worker`, else the cluster's CPUs less the share left to
    Ray Data (`ray.data_cpu_share`), split over the workers (e.g. 2 CPUs, share 0.5, 2 workers → 0.5 each)."""
    pre = config.pretrain
    if pre.cpus_per_worker is not None:
        cpus = pre.cpus_per_worker
    else:
        total = float(ray.cluster_resources().get("CPU", 1.0))
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


def _storage(output: str, storage_options: dict[str, Any]) -> tuple[str, Any]:
    """RunConfig's (storage_path, storage_filesystem) for `<output>/checkpoints`."""
    url = join(output, "checkpoints")
    fs, path = url_to_fs(url, storage_options)
    if is_local(fs):
        return os.path.abspath(path), None
    return path, pyarrow_filesystem(fs)


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
    storage_path, storage_fs = _storage(output, so)
    loop_config = {
        "config": config.model_dump(mode="json"),
        "output": output,
        "val": val_ref,
        "cache": cache,
        "epochs": epochs,
        "num_train": len(train),
        "threads": torch_threads(config, resources),
    }
    return TorchTrainer(
        train_loop,
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


def read_metrics(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl (empty when it does not exist yet)."""
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        return []
    text = fs.cat_file(path).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pretrain(
    config: Config,
    manifest_url: str,
    output: str,
    *,
    run_name: str = "pretrain",
    progress: Progress | None = None,
) -> PretrainResult:
    """Pretrain per `config` on the manifest's kept images; write `<output>/encoder.pth`, metrics and
    checkpoints. `progress("pretrain", step, steps)` is called as metrics arrive (every eval interval)."""
    so = config.data.storage_options
    metrics_url = join(output, METRICS_NAME)
    trainer = build_trainer(config, manifest_url, output, run_name=run_name)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(2.0):
            try:
                lines = read_metrics(metrics_url, so)
            except Exception:  # a half-listed object store must not kill the progress thread
                continue
            if lines and progress:
                progress("pretrain", int(lines[-1]["step"]), config.pretrain.steps)

    watcher = threading.Thread(target=poll, daemon=True) if progress else None
    start = time.perf_counter()
    if watcher:
        watcher.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if watcher:
            watcher.join()
    seconds = time.perf_counter() - start
    final = result.metrics or {}
    history = read_metrics(metrics_url, so)
    stopped = final.get("stopped") or (history[-1].get("stopped") if history else None)
    if stopped:
        raise TrainingDiverged(str(stopped))
    if progress:
        progress("pretrain", int(final.get("step", 0)), config.pretrain.steps)
    steps_covered = np.diff([0] + [int(h["step"]) for h in history])
    timed = [
        (h["images_per_s"], n) for h, n in zip(history, steps_covered, strict=True) if h.get("images_per_s")
    ]
    return PretrainResult(
        run_name=run_name,
        steps=int(final.get("step", history[-1]["step"] if history else 0)),
        first_loss=float(history[0]["loss"]) if history else math.nan,
        final_loss=float(final.get("loss", history[-1]["loss"] if history else math.nan)),
        val_loss=final.get("val_loss"),
        # lines cover different numbers of steps (log_every, or less up to a report): weight by them
        images_per_s=float(np.average([r for r, _ in timed], weights=[n for _, n in timed]))
        if timed
        else 0.0,
        seconds=seconds,
        encoder_url=join(output, ENCODER_NAME),
        metrics_url=metrics_url,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        history=history,
    )


# ---------------------------------------------------------------------------------------------- worker


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and tokens (1-D parameters), as in MAE."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(("token",)) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """MAE's AdamW (betas 0.9, 0.95; no decay on 1-D parameters), with torch's fused kernel on CPU and
    CUDA: one pass over all parameters instead of a loop per tensor group (measured on 2 CPU cores:
    0.057 → 0.021 s per update for ViT-S's 25M parameters)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), fused=True if fused else None
    )


class _Validator:
    """val_loss: masked-reconstruction loss on fixed images under a fixed random mask (same every call)."""

    def __init__(self, images: np.ndarray, ratio: float, seed: int, batch: int, device: torch.device):
        self.images = torch.from_numpy(np.array(images))  # a writable copy of the shared array
        self.ratio = ratio
        self.seed = seed
        self.batch = batch
        self.device = device

    @torch.no_grad()
    def __call__(self, model: MaskedAutoencoder) -> float | None:
        if len(self.images) == 0:
            return None
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.seed)
        total, count = 0.0, 0
        for start in range(0, len(self.images), self.batch):
            imgs = normalize_images(self.images[start : start + self.batch].to(self.device))
            noise = torch.rand(imgs.shape[0], model.num_patches, generator=generator).to(self.device)
            out = model(imgs, self.ratio, noise)
            total += float(out.recon_loss) * imgs.shape[0]
            count += imgs.shape[0]
        model.train(was_training)
        return total / count


def _all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


def _save_checkpoint(
    directory: str,
    model: MaskedAutoencoder,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: Config,
    history: list[dict[str, Any]],
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": config.redacted(),
        "metrics": history,
        "size": config.pretrain.model,
    }
    torch.save(state, os.path.join(directory, STATE_NAME))


def _quiet_report_lines(level: str) -> None:
    """Apply `ray.train_log_level` to the line Ray Train 2.60 logs for every report on each worker.

    That logger is named after its file path (`ray/train/v2/_internal/execution/context.py`), so the
    `LoggingConfig` filter, which matches names under `ray.train`, lets it through at any level.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: nothing to adjust
        return
    logging.getLogger(train_context.__file__).setLevel(level)


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Train worker: resume → train steps → validate / report / checkpoint → export (rank 0)."""
    config = Config.model_validate(loop_config["config"])
    _quiet_report_lines(config.ray.train_log_level)
    pre = config.pretrain
    so = config.data.storage_options
    output = loop_config["output"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(pre.seed * 1000 + rank)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    from stages.stream import image_size

    model = MaskedAutoencoder(
        size_of(config), norm_pix_loss=pre.norm_pix_loss, loss_head=pre.mask.strategy == "hard-patch"
    ).to(device)  # on the device before the optimizer exists, so resumed optimizer state lands there too
    global_batch = pre.batch_size * world
    peak_lr = pre.base_lr * global_batch / 256
    optimizer = build_optimizer(model, peak_lr, pre.weight_decay, device)

    step, history, resumed_from = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_NAME), map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), list(state["metrics"])
        resumed_from = step
        if rank == 0:
            log.warning("resuming %s from step %d", ctx.get_experiment_name(), step)
    elif pre.warm_start:
        load_warm_start(model, pre.warm_start, so)
    raw = model
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world > 1
    if rank == 0:
        log.info("effective batch %d, actual lr %.3e, %d steps", global_batch, peak_lr, pre.steps)

    grid = image_size(config) // raw.size.patch_size
    masker = Masker(pre.mask, grid, seed=pre.seed * 1_000_003 + rank * 7919 + step)
    validate = _Validator(
        ray.get(loop_config["val"]), pre.val_mask_ratio, pre.seed + 4242, pre.batch_size, device
    )
    if loop_config["cache"] is None:
        shard = ray.train.get_dataset_shard("train")

        def batches() -> Iterator[dict[str, Any]]:
            return shard.iter_torch_batches(batch_size=pre.batch_size, drop_last=True)
    else:
        from stages.stream import cached_batches

        skip = step  # resumed: go on from the batch after the checkpoint's, not from the first batch again

        def batches() -> Iterator[dict[str, Any]]:
            nonlocal skip
            start, skip = skip, 0
            return cached_batches(
                loop_config["cache"], config, loop_config["epochs"], pre.seed, rank, world, start=start
            )

    metrics_url = join(output, METRICS_NAME)

    interval_loss, interval_recon, interval_n = 0.0, 0.0, 0
    interval_images, interval_seconds = 0, 0.0
    first_step_of_run, reported = True, False
    latest: dict[str, Any] = history[-1] if history else {}
    while step < pre.steps:
        done = 0
        last = time.perf_counter()
        for batch in batches():
            done += 1
            imgs = normalize_images(torch.as_tensor(batch["image"]).to(device))
            ratio = mask_ratio_at(pre.mask, step, pre.steps)
            predicted = raw.predict_patch_loss(imgs) if masker.needs_prediction else None
            noise = masker(imgs.shape[0], ratio, step / max(pre.steps - 1, 1), predicted).to(device)
            lr = lr_at(pre, peak_lr, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                out = ddp(imgs, ratio, noise, pre.mask.loss_head_weight)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if pre.grad_clip:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), pre.grad_clip)
            optimizer.step()
            losses = _all_reduce_mean(torch.stack([out.loss.detach(), out.recon_loss.detach()]).float())
            step += 1
            now = time.perf_counter()
            if not first_step_of_run:  # the first step includes pipeline warm-up: timed apart
                interval_images += imgs.shape[0] * world
                interval_seconds += now - last
            first_step_of_run = False
            last = now
            loss, recon = float(losses[0]), float(losses[1])
            if not math.isfinite(loss):
                message = (
                    f"non-finite loss ({loss}) at step {step}: lower pretrain.base_lr "
                    f"(now {pre.base_lr}) or set pretrain.grad_clip"
                )
                if rank == 0:  # Train's Result keeps checkpointed metrics only: the driver reads this line
                    log.error(message)
                    history.append({"step": step, "loss": loss, "stopped": message, "time": time.time()})
                    body = "".join(json.dumps(h) + "\n" for h in history).encode()
                    atomic_write_bytes(metrics_url, body, so)
                ray.train.report(diverged_metrics(step, loss, message))
                return
            interval_loss += loss
            interval_recon += recon
            interval_n += 1
            save = step % pre.checkpoint_every == 0 or step == pre.steps
            report = save or step % pre.eval_every == 0
            if report or step % pre.log_every == 0:  # a report always carries this step's numbers
                latest = {
                    "step": step,
                    "loss": interval_loss / interval_n,
                    "recon_loss": interval_recon / interval_n,
                    "lr": lr,
                    "mask_ratio": ratio,
                    "images_per_s": interval_images / interval_seconds if interval_seconds else 0.0,
                    "time": time.time(),
                }
                if resumed_from is not None:  # the first line after a restart says where it resumed
                    latest["resumed_from"] = resumed_from
                    resumed_from = None
                history.append(latest)
                interval_loss, interval_recon, interval_n = 0.0, 0.0, 0
                interval_images, interval_seconds = 0, 0.0
            if report:
                reported = True
                _report(raw, optimizer, step, config, history, latest, validate, rank, save, metrics_url, so)
            if step >= pre.steps:
                break
        if done == 0:
            raise UserInputError(
                f"the training data gave no batch of {pre.batch_size} per worker: lower pretrain.batch_size"
            )
    if not reported:  # resumed a finished run: report its last metrics so the result carries them
        ray.train.report({k: v for k, v in latest.items() if k != "time"} | {"step": step})
    if rank == 0:
        atomic_write_bytes(join(output, ENCODER_NAME), encoder_bytes(raw), so)


# What each report holds besides `step` (a sweep's tune.metric is one of the first four).
REPORTED_METRICS = ("val_loss", "loss", "recon_loss", "images_per_s", "lr", "mask_ratio")


def diverged_metrics(step: int, loss: float, message: str) -> dict[str, Any]:
    """The last report of a run whose loss went non-finite: every metric present (NaN, `loss` as it was),
    since Ray Tune ends the whole sweep on a result without its metric, and `stopped` with the message."""
    return {**dict.fromkeys(REPORTED_METRICS, math.nan), "step": step, "loss": loss, "stopped": message}


def _report(
    model: MaskedAutoencoder,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: Config,
    history: list[dict[str, Any]],
    latest: dict[str, Any],
    validate: _Validator,
    rank: int,
    save: bool,
    metrics_url: str,
    storage_options: dict[str, Any],
) -> None:
    """Validate, write metrics.jsonl (rank 0), and report to Ray Train (with a checkpoint when `save`)."""
    val_loss = validate(model)
    metrics = {k: v for k, v in latest.items() if k != "time"}
    metrics.update(step=step, val_loss=val_loss if val_loss is not None else float("nan"))
    if history and history[-1]["step"] == step:
        history[-1]["val_loss"] = metrics["val_loss"]
    if rank == 0:
        body = "".join(json.dumps(h) + "\n" for h in history).encode()
        atomic_write_bytes(metrics_url, body, storage_options)
    if save and rank == 0:
        with tempfile.TemporaryDirectory() as d:
            _save_checkpoint(d, model, optimizer, step, config, history)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)
