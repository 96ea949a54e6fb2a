"""What each Ray Train worker runs to pretrain the MAE: `train_loop`, started by `pipeline.train.build_trainer`.

    train_loop:  load checkpoint → while step < steps: train_step → log → every eval_every: validate,
                 report (+ checkpoint every checkpoint_every) → export the encoder (rank 0)

Read top to bottom: the worker's setup (device, model, optimizer, checkpoint, data), one `train_step`, the
`MetricWindow` that turns steps into metrics.jsonl lines, and the `Reporter` that validates, writes
metrics.jsonl (rank 0) and reports to Ray Train, with a checkpoint when one is due.

- A checkpoint is one `state.pt`: model, optimizer, step, config (redacted), the metrics lines so far and the
  model size. A restarted worker resumes from the latest; from the decoded cache it goes on with the batch
  after the checkpoint's, streamed from storage it starts the data order over.
- Each report carries `step` and `REPORTED_METRICS`; Tune sweeps rank trials by one of them.
- A non-finite loss stops every worker at the same step: rank 0 appends the message to metrics.jsonl (the
  driver raises `TrainingDiverged` from it) and every worker's last report carries it.
- Nothing in a step waits for the device: losses stay device tensors until the next metrics line (every
  `log_every` steps, and at reports), where one all-reduce and one read-back cover the whole window; the
  non-finite check runs there too (and names the first non-finite step). Batches arrive on the device
  pinned and non-blocking, are augmented there (`pipeline.models.augment`), and the model's forward runs
  under `torch.compile` when `pretrain.compile` says so (on GPU workers by default).
- The first metrics line of each start of the workers carries `first_step_time` (wall clock when the
  first step was done): the driver reports the time from its `pretrain` call to there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from pipeline.core.config import Config, PretrainConfig
from pipeline.core.errors import UserInputError
from pipeline.core.ray_compat import quiet_train_report_lines
from pipeline.core.runs import ENCODER_NAME, METRICS_NAME
from pipeline.core.storage import atomic_write_bytes, join
from pipeline.models.augment import BatchAugment, to_device
from pipeline.models.checkpoint import export_encoder, load_warm_start
from pipeline.models.mae import MaskedAutoencoder, normalize_images, num_kept, size_of
from pipeline.models.masking import Masker
from pipeline.models.schedules import lr_at, mask_ratio_at

log = logging.getLogger(__name__)

STATE_NAME = "state.pt"

# What each report holds besides `step` (a sweep's tune.metric is one of the first four).
REPORTED_METRICS = ("val_loss", "loss", "recon_loss", "images_per_s", "lr", "mask_ratio")

Batches = Callable[[], Iterator[dict[str, Any]]]  # starts one pass over this worker's training batches
PREFETCH = 2  # batches made ready (read, decoded, on the device) ahead of the step that trains on them


def train_loop(loop_config: dict[str, Any]) -> None:
    """One Train worker: load checkpoint → while step < steps: train_step → log / validate / report
    (+ checkpoint) → export the encoder (rank 0). `loop_config` is what `build_trainer` hands every worker."""
    config = Config.model_validate(loop_config["config"])
    pre = config.pretrain
    quiet_train_report_lines(config.ray.train_log_level)
    worker = start_worker(loop_config["threads"], pre.seed)
    mae, optimizer = build_model(config, worker)
    run = load_checkpoint(mae, optimizer, config, worker)
    ddp = ray.train.torch.prepare_model(mae, move_to_device=False)  # DDP when world > 1, once loaded
    model = TrainModel(
        raw=mae,
        ddp=ddp,
        optimizer=optimizer,
        masker=build_masker(config, mae, worker, run.step),
        peak_lr=peak_lr(pre, worker.world),
        augment=build_augment(config, worker, run.step),
        forward=compiled(ddp) if compile_enabled(pre, worker) else ddp,
    )
    if worker.rank == 0:
        global_batch = pre.batch_size * worker.world
        log.info(
            "effective batch %d, actual lr %.3e, %d steps, %s",
            global_batch,
            model.peak_lr,
            pre.steps,
            "compiled" if model.forward is not ddp else "eager",
        )
    reporter = Reporter(config, worker, loop_config["output"], val_images=ray.get(loop_config["val"]))
    batches = batch_source(loop_config, config, worker, start=run.step)
    window = MetricWindow()

    while run.step < pre.steps:
        window.start_pass()
        trained = 0
        for batch in batches():
            result = train_step(model, batch, run.step, pre, worker)
            run.step += 1
            trained += 1
            if run.first_step_time is None:  # the first step of this start: wait for it once, to time it
                worker.synchronize()
                run.first_step_time = time.time()
            window.add(result)
            if log_due(run.step, pre):  # every report carries this step's numbers, so it logs too
                line = window.line(run.step, result)  # the window's one read-back from the device
                if window.nonfinite is not None:
                    reporter.stop_diverged(run, *window.nonfinite)
                    return
                run.add_line(line)
            if report_due(run.step, pre):
                reporter.report(model, run, save=checkpoint_due(run.step, pre))
            if run.step >= pre.steps:
                break
        if trained == 0:
            raise UserInputError(
                f"the training data gave no batch of {pre.batch_size} per worker: lower pretrain.batch_size"
            )
    reporter.finish(model, run)


# ---------------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Worker:
    """Where this worker runs: its rank among `world` workers and its torch device."""

    rank: int
    world: int
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        """Wait until the device has done all work queued so far (nothing to wait for on a CPU)."""
        if self.on_gpu:
            torch.cuda.synchronize(self.device)


def start_worker(threads: int, seed: int) -> Worker:
    """This worker's rank and device, with torch set up for it: `threads` intra-op threads (see
    `pipeline.train.torch_threads`) and a seed of its own, so workers draw different masks."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(threads)
    torch.manual_seed(seed * 1000 + rank)
    return Worker(rank=rank, world=world, device=ray.train.torch.get_device())


def build_model(config: Config, worker: Worker) -> tuple[MaskedAutoencoder, torch.optim.AdamW]:
    """The MAE on this worker's device, and its AdamW (see `build_optimizer`)."""
    pre = config.pretrain
    model = MaskedAutoencoder(
        size_of(config), norm_pix_loss=pre.norm_pix_loss, loss_head=pre.mask.strategy == "hard-patch"
    ).to(
        worker.device
    )  # on the device before the optimizer exists, so resumed optimizer state lands there too
    return model, build_optimizer(model, peak_lr(pre, worker.world), pre.weight_decay, worker.device)


def peak_lr(pre: PretrainConfig, world: int) -> float:
    """The learning rate after warm-up: base_lr × global batch / 256, as in MAE."""
    global_batch = pre.batch_size * world
    return pre.base_lr * global_batch / 256


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


def build_masker(config: Config, model: MaskedAutoencoder, worker: Worker, step: int) -> Masker:
    """The mask strategy of `pretrain.mask`, seeded per worker and by the step the run starts at, so a resumed
    run does not draw the masks it drew before."""
    from stages.stream import image_size

    pre = config.pretrain
    grid = image_size(config) // model.size.patch_size
    seed = pre.seed * 1_000_003 + worker.rank * 7919 + step
    return Masker(pre.mask, grid, seed=seed, device=worker.device)


def build_augment(config: Config, worker: Worker, step: int) -> BatchAugment:
    """Random resized crop + flip on this worker's device (`pretrain.augment`, `crop_scale_min`, `hflip`),
    seeded per worker and by the step the run starts at (as the masker is), apart from the masker's seed."""
    from stages.stream import image_size

    pre = config.pretrain
    seed = int(np.random.SeedSequence([pre.seed, worker.rank, step, 0xA5]).generate_state(1)[0])
    return BatchAugment(image_size(config), pre.crop_scale_min, pre.hflip, seed=seed, enabled=pre.augment)


def compile_enabled(pre: PretrainConfig, worker: Worker) -> bool:
    """`pretrain.compile`: on, off, or (auto) on when the worker trains on a GPU."""
    return pre.compile == "on" or (pre.compile == "auto" and worker.on_gpu)


def compiled(module: torch.nn.Module) -> Callable[..., Any]:
    """`module` under `torch.compile`: its forward and, through AOTAutograd, its backward in one graph each
    (the MAE has no graph break; `tests/pipeline/models/test_compile.py` holds it to that). A DDP module
    is split at its gradient buckets by Dynamo's DDP optimizer, so communication still overlaps."""
    return torch.compile(module)


@dataclass(frozen=True)
class TrainModel:
    """What a step trains: the MAE (`raw`; `ddp` is the module to call, DDP-wrapped when world > 1), its
    optimizer, the masker that draws each batch's mask, the peak learning rate of the schedule, the
    batch augmentation, and `forward`: `ddp` itself or `ddp` compiled (`pretrain.compile`)."""

    raw: MaskedAutoencoder
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    masker: Masker
    peak_lr: float
    augment: BatchAugment
    forward: Callable[..., Any]


@dataclass
class RunState:
    """How far the run is: restored from a checkpoint on resume, saved into the next one."""

    step: int = 0  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl lines so far
    resumed_from: int | None = None  # the step a restart resumed at, until the next line records it
    reported: bool = False  # whether this start of the run has reported to Ray Train yet
    first_step_time: float | None = None  # wall clock when this start's first step was done
    _first_step_logged: bool = False  # whether a line carries `first_step_time` yet

    @property
    def latest(self) -> dict[str, Any]:
        """The last metrics line ({} before the first)."""
        return self.history[-1] if self.history else {}

    def add_line(self, line: dict[str, Any]) -> None:
        """Append a metrics line; the first after a restart says where it resumed."""
        if self.resumed_from is not None:
            line["resumed_from"] = self.resumed_from
            self.resumed_from = None
        if self.first_step_time is not None and not self._first_step_logged:
            line["first_step_time"] = self.first_step_time
            self._first_step_logged = True
        self.history.append(line)


def load_checkpoint(
    model: MaskedAutoencoder, optimizer: torch.optim.Optimizer, config: Config, worker: Worker
) -> RunState:
    """Resume from Ray Train's latest checkpoint (model, optimizer, step, metrics so far) when there is one;
    else start at step 0, from the `pretrain.warm_start` weights when set."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        if config.pretrain.warm_start:
            load_warm_start(model, config.pretrain.warm_start, config.data.storage_options)
        return RunState()
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_NAME), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    if worker.rank == 0:
        log.warning("resuming %s from step %d", ray.train.get_context().get_experiment_name(), step)
    return RunState(step=step, history=list(state["metrics"]), resumed_from=step)


def save_checkpoint(directory: str, model: TrainModel, run: RunState, config: Config) -> None:
    """Write `state.pt` into `directory`: what `load_checkpoint` reads back, with the config and model size
    so that the checkpoint explains itself."""
    state = {
        "model": model.raw.state_dict(),
        "optimizer": model.optimizer.state_dict(),
        "step": run.step,
        "config": config.redacted(),
        "metrics": run.history,
        "size": config.pretrain.model,
    }
    torch.save(state, os.path.join(directory, STATE_NAME))


def batch_source(loop_config: dict[str, Any], config: Config, worker: Worker, start: int) -> Batches:
    """This worker's training batches, one pass per call.

    Streamed: the shard of the training dataset Ray Train split off for this worker. Cached: this worker's
    share of the decoded images in the object store; the first pass after a resume starts at the batch
    after the checkpoint's (`start`), not at the first batch again. Either way `PREFETCH` batches are
    made ready ahead of the step, already on the worker's device (pinned and copied non-blocking to a
    GPU), not yet augmented."""
    pre = config.pretrain
    if loop_config["cache"] is None:
        shard = ray.train.get_dataset_shard("train")

        def streamed() -> Iterator[dict[str, Any]]:
            return shard.iter_torch_batches(  # device "auto": the Train worker's device
                batch_size=pre.batch_size,
                drop_last=True,
                prefetch_batches=PREFETCH,
                pin_memory=worker.on_gpu,
            )

        return streamed

    from stages.stream import cached_batches

    skip = start

    def cached() -> Iterator[dict[str, Any]]:
        nonlocal skip
        first, skip = skip, 0
        return cached_batches(
            loop_config["cache"],
            config,
            loop_config["epochs"],
            pre.seed,
            worker.rank,
            worker.world,
            start=first,
            prepare=lambda b: {"image": to_device(torch.from_numpy(b["image"]), worker.device)},
            prefetch=PREFETCH,
        )

    return cached


# ---------------------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepResult:
    """One step's numbers: this worker's losses, still on the device (`MetricWindow` averages them over
    the workers when it reads them back), and the schedules' values it ran at."""

    losses: torch.Tensor  # (2,) float32 on the device: total loss (reconstruction + the hard-patch loss
    # head's, when there is one), masked-reconstruction loss
    lr: float
    mask_ratio: float
    images: int  # images in the step, all workers together


def train_step(
    model: TrainModel, batch: dict[str, Any], step: int, pre: PretrainConfig, worker: Worker
) -> StepResult:
    """One optimizer step on `batch` at `step` (the steps done before it): augmentation on the device, mask
    ratio and lr from their schedules, bf16 autocast on GPU only, gradient clipping. Nothing here waits
    for the device: masks (hard-patch ones from the predicted losses too) are drawn on it."""
    images = to_device(torch.as_tensor(batch["image"]), worker.device)  # (N, S, S, 3) uint8
    imgs = model.augment(normalize_images(images))  # (N, 3, S, S), normalised, cropped and flipped
    ratio = mask_ratio_at(pre.mask, step, pre.steps)
    predicted = model.raw.predict_patch_loss(imgs) if model.masker.needs_prediction else None
    noise = model.masker(imgs.shape[0], ratio, step / max(pre.steps - 1, 1), predicted)
    lr = lr_at(pre, model.peak_lr, step)
    for group in model.optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=worker.on_gpu):
        # len_keep as an int: under torch.compile a ratio schedule then costs one recompile, not one per ratio
        out = model.forward(
            imgs,
            ratio,
            to_device(noise, worker.device),
            pre.mask.loss_head_weight,
            len_keep=num_kept(model.raw.num_patches, ratio),
        )
    model.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if pre.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.ddp.parameters(), pre.grad_clip)
    model.optimizer.step()
    return StepResult(
        losses=torch.stack([out.loss.detach(), out.recon_loss.detach()]).float(),
        lr=lr,
        mask_ratio=ratio,
        images=imgs.shape[0] * worker.world,
    )


def _all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


def checkpoint_due(step: int, pre: PretrainConfig) -> bool:
    """Every `checkpoint_every` steps, and at the last step."""
    return step % pre.checkpoint_every == 0 or step == pre.steps


def report_due(step: int, pre: PretrainConfig) -> bool:
    """Every `eval_every` steps, and whenever a checkpoint is due (a checkpoint goes out with a report)."""
    return checkpoint_due(step, pre) or step % pre.eval_every == 0


def log_due(step: int, pre: PretrainConfig) -> bool:
    """Every `log_every` steps, and whenever a report is due."""
    return report_due(step, pre) or step % pre.log_every == 0


# ---------------------------------------------------------------------------------------------- metrics


class MetricWindow:
    """The steps since the last metrics line: their mean losses and training throughput.

    The steps' losses stay on the device until `line`, which reads the whole window back at once: one
    all-reduce (each step's losses averaged over the workers, as every worker sees them) and one host sync
    per line instead of per step. `line` also notes the window's first non-finite loss (`nonfinite`).

    Throughput counts the time between consecutive steps (waiting for data included) up to the read-back
    (so device time still queued when the last step returned counts too), except for the run's first step,
    which includes the data pipeline's warm-up and is timed apart (left out)."""

    def __init__(self) -> None:
        self._first_step = True
        self._last = time.perf_counter()
        self.nonfinite: tuple[int, float] | None = None  # (step, loss) of the first non-finite loss
        self._reset()

    def _reset(self) -> None:
        self.losses: list[torch.Tensor] = []  # per step: (2,) total and reconstruction loss, on the device
        self.images, self.seconds = 0, 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def start_pass(self) -> None:
        """A new pass over the batches begins: time its first step from here."""
        self._last = time.perf_counter()

    def add(self, result: StepResult) -> None:
        now = time.perf_counter()
        if not self._first_step:
            self.images += result.images
            self.seconds += now - self._last
        self._first_step = False
        self._last = now
        self.losses.append(result.losses)

    def line(self, step: int, result: StepResult) -> dict[str, Any]:
        """The metrics.jsonl line of the steps up to `step`, with the lr and mask ratio of the last of them
        (`result`); the window then starts over. Sets `nonfinite` when a loss in the window is NaN or
        infinite (the same on every worker: the values are averaged over them first)."""
        per_step = _all_reduce_mean(torch.stack(self.losses)).tolist()  # the read-back: [[loss, recon], ...]
        now = time.perf_counter()
        if self.images:  # the wait for the device belongs to this window's steps
            self.seconds += now - self._last
        self._last = now
        first = step - len(per_step) + 1
        bad = next(((first + i, v[0]) for i, v in enumerate(per_step) if not math.isfinite(v[0])), None)
        self.nonfinite = self.nonfinite or bad
        line = {
            "step": step,
            "loss": sum(v[0] for v in per_step) / len(per_step),
            "recon_loss": sum(v[1] for v in per_step) / len(per_step),
            "lr": result.lr,
            "mask_ratio": result.mask_ratio,
            "images_per_s": self.images / self.seconds if self.seconds else 0.0,
            "time": time.time(),
        }
        self._reset()
        return line


class Validator:
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


def diverged_metrics(step: int, loss: float, message: str) -> dict[str, Any]:
    """The last report of a run whose loss went non-finite: every metric present (NaN, `loss` as it was),
    since Ray Tune ends the whole sweep on a result without its metric, and `stopped` with the message."""
    return {**dict.fromkeys(REPORTED_METRICS, math.nan), "step": step, "loss": loss, "stopped": message}


class Reporter:
    """Everything that leaves the worker: metrics.jsonl (rank 0), reports to Ray Train (every worker: Train
    waits for all), checkpoints (rank 0, with a report) and, at the end, the encoder (rank 0)."""

    def __init__(self, config: Config, worker: Worker, output: str, val_images: np.ndarray):
        pre = config.pretrain
        self.config = config
        self.worker = worker
        self.output = output
        self.metrics_url = join(output, METRICS_NAME)
        self.validate = Validator(
            val_images, pre.val_mask_ratio, pre.seed + 4242, pre.batch_size, worker.device
        )

    def report(self, model: TrainModel, run: RunState, save: bool) -> None:
        """Validate, write metrics.jsonl (rank 0), and report to Ray Train (with a checkpoint when `save`)."""
        run.reported = True
        val_loss = self.validate(model.raw)
        metrics = {k: v for k, v in run.latest.items() if k != "time"}
        metrics.update(step=run.step, val_loss=val_loss if val_loss is not None else float("nan"))
        if run.history and run.history[-1]["step"] == run.step:
            run.history[-1]["val_loss"] = metrics["val_loss"]
        self._write_metrics(run.history)
        if save and self.worker.rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, run, self.config)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    def stop_diverged(self, run: RunState, step: int, loss: float) -> None:
        """The loss went non-finite at `step` (seen at `run.step`, when the window was read back): stop with a
        message that says what to try. Train's Result keeps checkpointed metrics only, so rank 0 writes the
        message into metrics.jsonl for the driver."""
        pre = self.config.pretrain
        message = (
            f"non-finite loss ({loss}) at step {step}: lower pretrain.base_lr "
            f"(now {pre.base_lr}) or set pretrain.grad_clip"
        )
        if self.worker.rank == 0:
            log.error(message)
            run.history.append({"step": run.step, "loss": loss, "stopped": message, "time": time.time()})
            self._write_metrics(run.history)
        ray.train.report(diverged_metrics(run.step, loss, message))

    def finish(self, model: TrainModel, run: RunState) -> None:
        """The last steps are done: write the encoder (rank 0). A resumed run that had nothing left to train
        reports its last metrics first, so that the run's result carries them."""
        if not run.reported:
            ray.train.report({k: v for k, v in run.latest.items() if k != "time"} | {"step": run.step})
        if self.worker.rank == 0:
            export_encoder(model.raw, join(self.output, ENCODER_NAME), self.config.data.storage_options)

    def _write_metrics(self, history: list[dict[str, Any]]) -> None:
        if self.worker.rank == 0:
            body = "".join(json.dumps(line) + "\n" for line in history).encode()
            atomic_write_bytes(self.metrics_url, body, self.config.data.storage_options)
