"""GPU pretraining: the bare MAE step's speed and MFU vs `pretrain` (streamed, cached) vs a DataLoader.

Issue 20's benchmark. It measures, in one run and on the same files:

1. The bare step: the project's own training step (`pipeline.train_loop.train_step` on a `TrainModel`:
   device-side crop + flip, masker, lr schedule, bf16 autocast on GPU, gradient clipping, fused AdamW) on
   a fixed batch already on the device, for ViT-B/16 and ViT-L/16 MAEs at 224 px, batch 256, mask ratio
   0.75 and 0.0, eager and under `torch.compile` (`pipeline.train_loop.compiled`, as `pretrain.compile`
   runs it). Blocks of steps at the two ratios alternate, so a busy moment hits both; rates are medians.
   FLOPs per step are counted by `torch.utils.flop_counter.FlopCounterMode` over one eager step's
   forward + backward (the optimizer's elementwise work counts no FLOPs). MFU is measured against the
   device's data-sheet peak (`SPEC_BF16_TFLOPS`, when the device is in it) and against a plain bf16
   8192³ matmul timed in the same run (`_mfu_vs_matmul`).
2. `pipeline.train.pretrain` (what `maskdiet pretrain` runs) on a manifest from `pipeline.curate.curate`
   (`score.method=none`) over generated 224 px JPEGs, with the same model, batch and mask ratio as the bare
   ViT-B step: streamed from storage (`pretrain.cache_decoded_mib=0`) and from the decoded cache. Its
   steady rate comes from the metrics.jsonl lines after a warm-up share of the steps; `_call_images_per_s`
   is over the whole `pretrain` call; `_loop_images_per_s` is its own summary. The start-up is broken
   down into Ray's start, `build_trainer` and `fit()` to the first step done (a fresh Ray is started for
   the timed runs: curation ran on one of its own, so no Ray worker is warm). The compile in the Train
   worker may hit inductor's on-disk cache filled by the bare step's compile, as a user's second run does.
3. The baseline: a hand-written `torch.utils.data.DataLoader` (cores − 2 workers, forked, pinned,
   persistent): PIL decode + torchvision `RandomResizedCrop` + flip per image, feeding the same compiled
   ViT-B step (its device-side augmentation off, since the crop was done on the CPU); steady rate after
   a warm-up.

Without CUDA it prints one `skipped_no_cuda: 1` row and exits 0 (the CPU machines that run `run_all.py`).
`--device cpu` (or `MASKDIET_BENCH_FORCE_CPU=1`) runs every measurement on the CPU with tiny models and
sizes, fp32, `torch.compile` with the cheap `aot_eager` backend (Dynamo's tracing and AOTAutograd, not
inductor's code generation): a smoke test of the whole code path, its numbers meaningless (and no spec
MFU: there is no CPU peak in the table). `MASKDIET_BENCH_TINY=1` on a GPU machine runs the same tiny sizes
on the GPU (bf16, inductor): a pre-flight of a few minutes before the full run.

    python -m benchmarks.gpu_pretrain [--quick] [-v]            # the GPU run (sized for ~8 min on an H200)
    MASKDIET_BENCH_TINY=1 python -m benchmarks.gpu_pretrain -v  # GPU pre-flight, tiny sizes
    python -m benchmarks.gpu_pretrain --device cpu -v           # the whole path on CPU, tiny sizes

The GPU run's length is an estimate (it has not run on a GPU yet): most of it is inductor compiling four
graphs (ViT-B and ViT-L at two mask ratios) and the Train worker compiling ViT-B. `run_all.py` allows a
module 600 s by default; pass `--timeout 1200` there if it runs out (the rows measured by then still
print).

Rows print as they are measured, so a run that fails or is stopped half-way still shows what it got.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/gpu_pretrain.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import torch

from benchmarks.common import Row, print_rows, ratio, tiny, with_start_retries

if TYPE_CHECKING:  # imported where used: the skip path must not pay for Ray's and Train's imports
    from pipeline.core.config import Config, PretrainConfig
    from pipeline.train_loop import TrainModel, Worker

log = logging.getLogger(__name__)

# The targets (read by run_all.py).
TARGETS = {
    "vit_l_mask075_compiled_mfu": (">=", 0.45),
    "vit_b_mask075_compiled_mfu": (">=", 0.35),
    "vit_l_mask_speedup": (">=", 3.0),
    "pretrain_streamed_vs_bare": (">=", 0.95),
    "pretrain_cached_vs_bare": (">=", 0.95),
    "pretrain_streamed_vs_dataloader": (">=", 1.0),
    "pretrain_cached_vs_dataloader": (">=", 1.0),
    "time_to_first_step_s": ("<=", 20.0),
}

FORCE_CPU_ENV = "MASKDIET_BENCH_FORCE_CPU"  # set (with MASKDIET_BENCH_TINY) by the test: the CPU path
SKIP_ROW: Row = ("skipped_no_cuda", 1.0)

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s, matched as substrings of
# `torch.cuda.get_device_name()` in this order: the PCIe and NVL H100s run fewer SMs or lower clocks than
# the SXM one the plain "H100" entry means. A device not listed gets only the measured-matmul MFU.
SPEC_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),  # H200 SXM (and GH200's GPU)
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # H100 SXM
    ("A100", 312.0),  # SXM and PCIe alike
)

RATIOS = (0.75, 0.0)  # mask ratios of the bare step: MAE's, and nothing masked (a plain autoencoder)


def spec_peak_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of the GPU called `device_name`, None when it is not in the table."""
    return next((peak for key, peak in SPEC_BF16_TFLOPS if key in device_name), None)


# ---------------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """Sizes of one run: the GPU's full and quick runs, and the tiny one (CPU override, or TINY on a GPU)."""

    models: tuple[tuple[str, str], ...]  # (row prefix, MAE name) of the bare step; the first is pretrained
    image_px: int  # model input side
    source_px: int  # side of the generated JPEGs
    batch: int
    warmup_steps: int  # untimed steps per mask ratio before the timed blocks (the first compiles)
    blocks: int  # timed blocks per mode and ratio, alternating the ratios
    block_steps: int  # steps per timed block
    matmul_n: int  # side of the square matmul that measures the device's reachable peak
    matmul_iters: int
    images: int  # generated JPEGs for the pipeline rows and the DataLoader
    pretrain_steps: int
    steady_after: int  # metrics lines whose window starts at or after this step are the steady state
    log_every: int
    loader_warmup: int  # DataLoader batches before its timed ones
    loader_steps: int
    cache_mib: int  # pretrain.cache_decoded_mib of the cached run: the whole set fits
    ray_cpus: int | None  # local Ray's CPUs (None: all of the machine's)
    object_store_mb: int | None  # local Ray's object store (None: Ray's default share of memory)


def workload(device: torch.device, quick: bool) -> Workload:
    """The sizes for `device`: tiny on CPU (and with MASKDIET_BENCH_TINY), the issue's on a GPU."""
    if device.type == "cpu" or tiny():
        # On the CPU both rows use the micro MAE (the smoke test's time goes to Ray and the pretrain runs);
        # a GPU pre-flight takes the mini one for ViT-L, so two models of different shapes compile.
        larger = "mae_vit_micro_patch4" if device.type == "cpu" else "mae_vit_mini_patch4"
        return Workload(
            models=(("vit_b", "mae_vit_micro_patch4"), ("vit_l", larger)),
            image_px=32,
            source_px=48,
            batch=8,
            warmup_steps=1,
            blocks=2,
            block_steps=1,
            matmul_n=256,
            matmul_iters=5,
            images=80,
            pretrain_steps=6,
            steady_after=2,
            log_every=2,
            loader_warmup=2,
            loader_steps=4,
            cache_mib=64,
            ray_cpus=2 if device.type == "cpu" else None,
            object_store_mb=1000 if device.type == "cpu" else None,
        )
    return Workload(
        models=(("vit_b", "mae_vit_base_patch16"), ("vit_l", "mae_vit_large_patch16")),
        image_px=224,
        source_px=224,
        batch=256,
        warmup_steps=3,
        blocks=3,
        block_steps=5 if quick else 10,
        matmul_n=8192,
        matmul_iters=50,
        images=3000 if quick else 6000,
        pretrain_steps=80 if quick else 150,
        steady_after=30 if quick else 50,
        log_every=10,
        loader_warmup=10,
        loader_steps=30 if quick else 60,
        cache_mib=4096,
        ray_cpus=None,
        object_store_mb=None,
    )


def choose_device(requested: str | None) -> torch.device | None:
    """`requested` (cpu / cuda / auto); else CPU when MASKDIET_BENCH_FORCE_CPU is set; else CUDA when
    there is one; None: no CUDA and no override, so the benchmark skips."""
    if requested in (None, "auto"):
        requested = "cpu" if os.environ.get(FORCE_CPU_ENV, "") not in ("", "0") else None
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return None


def make_config(work: Workload, device: torch.device, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """The settings the bare step and `pretrain` share (model input side, batch, mask), plus `overrides`."""
    from pipeline.core.config import load_config

    return load_config(
        overrides=[
            f"decode.image_size={work.image_px}",
            f"pretrain.model={work.models[0][1]}",
            f"pretrain.batch_size={work.batch}",
            "pretrain.mask.ratio=0.75",
            f"pretrain.use_gpu={'true' if device.type == 'cuda' else 'false'}",
            *overrides,
        ]
    )


class Rows:
    """The rows measured so far; each also goes to `emit` when measured (printed as it comes)."""

    def __init__(self, emit: Callable[[Row], None] | None = None) -> None:
        self.rows: list[Row] = []
        self.emit = emit

    def add(self, name: str, value: float | None) -> float:
        """Record `name` (None becomes NaN: a measurement that did not happen shows as one)."""
        row = (name, math.nan if value is None else float(value))
        self.rows.append(row)
        log.info("%s: %s", *row)
        if self.emit:
            self.emit(row)
        return row[1]

    @property
    def value(self) -> dict[str, float]:
        return dict(self.rows)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a step returns before the GPU has run it (nothing syncs in it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- matmul


def matmul_tflops(device: torch.device, n: int, iters: int, repeats: int = 3) -> float:
    """TFLOP/s of an `n`³ matmul (bf16 on GPU, fp32 on CPU), median of `repeats` timed runs of `iters`:
    what this device reaches on the easiest possible work, the denominator of `_mfu_vs_matmul`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        synchronize(device)
        rates.append(2.0 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    log.info("matmul %d³ %s: %s TFLOP/s", n, dtype, [f"{r:.1f}" for r in rates])
    return statistics.median(rates)


# ---------------------------------------------------------------------------------------------- bare step


@dataclass
class StepRig:
    """One model's training step as a Train worker runs it, on a fixed batch of decoded images already on
    the device: `eager` and `compiled` are `TrainModel`s sharing the model and optimizer; `pres` holds the
    pretrain settings of each mask ratio (the ratio reaches `train_step` through them)."""

    worker: Worker
    eager: TrainModel
    compiled: TrainModel
    pres: dict[float, PretrainConfig]  # by mask ratio
    batch: dict[str, torch.Tensor]
    size: int
    step: int = 0

    def run(
        self, model: TrainModel, ratio_: float, steps: int, batches: Iterator[dict[str, Any]] | None = None
    ) -> float:
        """Seconds for `steps` steps (the device drained before and after); from `batches` when given."""
        from pipeline.train_loop import train_step

        pre = self.pres[ratio_]
        synchronize(self.worker.device)
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(batches) if batches is not None else self.batch
            train_step(model, batch, self.step % pre.steps, pre, self.worker)
            self.step += 1
        synchronize(self.worker.device)
        return time.perf_counter() - start


def compile_forward(module: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
    """The forward `pretrain.compile` runs on a GPU (`pipeline.train_loop.compiled`: inductor); on the CPU
    smoke path Dynamo's `aot_eager` backend, which traces the same graph (forward and backward) in seconds
    instead of inductor's minute of code generation on 2 cores."""
    from pipeline.train_loop import compiled

    return compiled(module) if device.type == "cuda" else torch.compile(module, backend="aot_eager")


def build_rig(work: Workload, name: str, device: torch.device) -> StepRig:
    """The MAE `name`, its optimizer, masker and augmentation as `train_loop` builds them (rank 0 of 1)."""
    from pipeline.models.mae import MaskedAutoencoder, size_of
    from pipeline.train_loop import (
        TrainModel,
        Worker,
        build_augment,
        build_masker,
        build_optimizer,
        peak_lr,
    )

    # steps: a long schedule, so the lr the steps run at is a realistic one (the value does not change
    # the step's cost)
    config = make_config(work, device, [f"pretrain.model={name}", "pretrain.steps=100000"])
    worker = Worker(rank=0, world=1, device=device)
    torch.manual_seed(0)
    mae = MaskedAutoencoder(size_of(config), norm_pix_loss=config.pretrain.norm_pix_loss).to(device)
    pre = config.pretrain
    eager = TrainModel(
        raw=mae,
        ddp=mae,
        optimizer=build_optimizer(mae, peak_lr(pre, 1), pre.weight_decay, device),
        masker=build_masker(config, mae, worker, 0),
        peak_lr=peak_lr(pre, 1),
        augment=build_augment(config, worker, 0),
        forward=mae,
    )
    pres = {}
    for mask_ratio in RATIOS:
        pres[mask_ratio] = pre.model_copy(deep=True)
        pres[mask_ratio].mask.ratio = mask_ratio
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (work.batch, work.image_px, work.image_px, 3), generator=generator)
    return StepRig(
        worker=worker,
        eager=eager,
        compiled=dataclasses.replace(eager, forward=compile_forward(mae, device)),
        pres=pres,
        batch={"image": images.to(torch.uint8).to(device)},
        size=work.image_px,
    )


@dataclass(frozen=True)
class StepFlops:
    """What FlopCounterMode counted over one training step."""

    total: float  # FLOPs of one step (forward + backward)
    attention: float  # of which in scaled-dot-product attention (0 where the counter has no formula: CPU)


ATTENTION = "attention"  # in the name of each of FlopCounterMode's SDPA kernels (flash, efficient, cudnn)


def count_flops(rig: StepRig, mask_ratio: float) -> StepFlops:
    """FLOPs of one eager step at `mask_ratio`, counted by FlopCounterMode (matmuls, convolutions and, on
    CUDA, the attention kernels; the CPU's fused attention kernel has no formula there)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        rig.run(rig.eager, mask_ratio, 1)
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in by_op.items() if ATTENTION in str(op))
    log.info("FLOPs per step at mask %.2f: %s", mask_ratio, {str(k): f"{v:.3g}" for k, v in by_op.items()})
    return StepFlops(total=float(counter.get_total_flops()), attention=float(attention))


@dataclass
class ModeTimes:
    """Seconds per step of each timed block, by mask ratio (block i of each ratio ran back to back)."""

    seconds: dict[float, list[float]]

    def rate(self, mask_ratio: float, batch: int) -> float:
        return batch / statistics.median(self.seconds[mask_ratio])

    def speedup(self) -> float:
        """Median over the blocks of (step time at 0.0) / (step time at 0.75)."""
        pairs = [full / masked for masked, full in zip(self.seconds[0.75], self.seconds[0.0], strict=True)]
        return statistics.median(pairs)


def time_mode(rig: StepRig, model: TrainModel, work: Workload) -> ModeTimes:
    """`warmup_steps` untimed steps at each ratio (a compiled model compiles its graph for that ratio
    in the first), then `blocks` timed blocks of `block_steps` steps, the ratios alternating."""
    for mask_ratio in RATIOS:
        with timed_log(f"warm-up at mask {mask_ratio}"):
            rig.run(model, mask_ratio, work.warmup_steps)
    seconds: dict[float, list[float]] = {r: [] for r in RATIOS}
    for _ in range(work.blocks):
        for mask_ratio in RATIOS:
            seconds[mask_ratio].append(rig.run(model, mask_ratio, work.block_steps) / work.block_steps)
    log.info("seconds per step: %s", seconds)
    return ModeTimes(seconds)


@contextlib.contextmanager
def timed_log(what: str) -> Iterator[None]:
    """Log how long the block took (progress with -v: where a slow run spends its minutes)."""
    start = time.perf_counter()
    yield
    log.info("%s took %.1f s", what, time.perf_counter() - start)


def bare_rows(rows: Rows, key: str, rig: StepRig, work: Workload, matmul: float, peak: float | None) -> float:
    """Measure one model's bare step (eager, then compiled, each at both ratios) into `rows`; returns the
    compiled rate at mask 0.75 (what `pretrain` and the DataLoader are compared with)."""
    flops = {r: count_flops(rig, r) for r in RATIOS}
    for mask_ratio in RATIOS:
        tag = f"{key}_mask{round(mask_ratio * 100):03d}"
        rows.add(f"{tag}_gflops_per_image", flops[mask_ratio].total / work.batch / 1e9)
        rows.add(f"{tag}_attention_flop_share", ratio(flops[mask_ratio].attention, flops[mask_ratio].total))
    if rig.worker.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = {}
    for mode, model in (("eager", rig.eager), ("compiled", rig.compiled)):
        with timed_log(f"{key} {mode}"):
            times = time_mode(rig, model, work)
        for mask_ratio in RATIOS:
            tag = f"{key}_mask{round(mask_ratio * 100):03d}_{mode}"
            rate = rates[mode, mask_ratio] = times.rate(mask_ratio, work.batch)
            tflops = flops[mask_ratio].total / work.batch * rate / 1e12
            rows.add(f"{tag}_images_per_s", rate)
            rows.add(f"{tag}_tflops", tflops)
            if peak is not None:
                rows.add(f"{tag}_mfu", tflops / peak)
            rows.add(f"{tag}_mfu_vs_matmul", ratio(tflops, matmul))
        rows.add(
            f"{key}_mask_speedup" if mode == "compiled" else f"{key}_eager_mask_speedup", times.speedup()
        )
    rows.add(f"{key}_compiled_speedup_vs_eager", ratio(rates["compiled", 0.75], rates["eager", 0.75]))
    if rig.worker.device.type == "cuda":
        rows.add(f"{key}_peak_gpu_mb", torch.cuda.max_memory_allocated() / 2**20)
    return rates["compiled", 0.75]


# ---------------------------------------------------------------------------------------------- DataLoader


class JpegCrops(torch.utils.data.Dataset):
    """What a user writes by hand: path → PIL decode → torchvision RandomResizedCrop + flip → (S, S, 3)
    uint8, the layout maskdiet's stream delivers (the step normalises and transposes on the device)."""

    def __init__(self, paths: list[str], size: int, scale_min: float, flip_p: float) -> None:
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(size, scale=(scale_min, 1.0)),
                transforms.RandomHorizontalFlip(flip_p),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            crop = self.transform(image.convert("RGB"))
        return {"image": torch.from_numpy(np.array(crop, dtype=np.uint8))}


def contiguous(images: torch.Tensor) -> torch.Tensor:
    """The DataLoader feed's stand-in for the step's device-side crop: the batch as it is, but contiguous
    as a crop's output is. `normalize_images` leaves the channels-last strides of the (N, S, S, 3) batch,
    and the compiled step guards on strides: without this it would recompile for the feed and run a graph
    of its own, not the one the bare step timed."""
    return images.contiguous()


def loader_batches(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, Any]]:
    """The loader's batches epoch after epoch (its workers persist), without end."""
    while True:
        yield from loader


def dataloader_rate(rig: StepRig, paths: list[str], work: Workload, workers: int) -> float:
    """Steady images/s of the compiled mask-0.75 step fed by a plain DataLoader: `loader_warmup` untimed
    batches (the workers start and fill their queues), then `loader_steps` timed. The step's own
    device-side crop is off (`contiguous`): the DataLoader's workers did it. A worker that hangs fails the
    run after 300 s instead of stalling it."""
    pre = rig.pres[0.75]
    dataset = JpegCrops(paths, rig.size, pre.crop_scale_min, pre.hflip)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=work.batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=rig.worker.device.type == "cuda",
        persistent_workers=True,
        timeout=300,
    )
    model = dataclasses.replace(rig.compiled, augment=contiguous)
    batches = loader_batches(loader)
    try:
        rig.run(model, 0.75, work.loader_warmup, batches)
        seconds = rig.run(model, 0.75, work.loader_steps, batches)
    finally:
        batches.close()  # drops the loader's iterator: its workers stop before Ray starts
        del loader
        gc.collect()
    return work.loader_steps * work.batch / seconds


# ---------------------------------------------------------------------------------------------- pretrain


def write_jpegs(folder: str, work: Workload) -> list[str]:
    """`work.images` JPEG photo crops (`source_px`², a class per sample photo) under `folder`."""
    from pipeline.demo_data import PHOTOS, DemoSpec, write_demo_data

    per_class = max(1, work.images // len(PHOTOS))
    write_demo_data(
        folder, DemoSpec(sources=("photos",), per_class=per_class, size=work.source_px, image_format="jpg")
    )
    return sorted(str(p) for p in Path(folder).rglob("*.jpg"))


def start_ray(work: Workload) -> float:
    """Start a local Ray through the project's helper (dashboard off: a GPU machine may lack its packages);
    returns the seconds it took."""
    from pipeline.core.runtime import configure_data_context, start_local_ray

    start = time.perf_counter()
    with_start_retries(
        lambda: start_local_ray(
            num_cpus=work.ray_cpus,
            include_dashboard=False,
            object_store_memory=work.object_store_mb * 1_000_000 if work.object_store_mb else None,
        )
    )
    configure_data_context()
    return time.perf_counter() - start


@contextlib.contextmanager
def timed_build_trainer() -> Iterator[list[tuple[float, float]]]:
    """Record the wall-clock span of every `pipeline.train.build_trainer` call `pretrain` makes (the
    module's global is swapped for a timing wrapper, so `pretrain` runs unchanged): the start-up's split
    between building the trainer and `fit()` to the first step."""
    import pipeline.train as train

    original = train.build_trainer
    spans: list[tuple[float, float]] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            spans.append((start, time.time()))

    with mock.patch.object(train, "build_trainer", timed):
        yield spans


def steady_rate(history: list[dict[str, Any]], after: int) -> float:
    """Images/s over the metrics lines whose window starts at or after step `after`. Each line's rate is
    over the steps since the previous line, so the lines are weighted by their time, not averaged: every
    step trains one batch, so a line of n steps at rate r took n × batch / r seconds, and the rate over the
    lines is Σn / Σ(n / r) (the batch cancels out). NaN when no line qualifies."""
    previous, steps, steps_per_rate = 0, 0, 0.0
    for line in history:
        step = int(line["step"])
        rate = line.get("images_per_s") or 0.0
        if previous >= after and rate > 0 and step > previous:
            steps += step - previous
            steps_per_rate += (step - previous) / rate
        previous = step
    return steps / steps_per_rate if steps_per_rate else math.nan


@dataclass(frozen=True)
class PretrainRun:
    """One `pretrain` call's rates (images/s) and start-up split (seconds)."""

    steady: float  # images/s, metrics lines after the warm-up share
    loop: float  # PretrainResult.images_per_s: the run's own summary
    call: float  # images/s over the whole `pretrain` call
    call_s: float
    first_step_s: float  # PretrainResult.first_step_seconds: the call to the first step done
    build_trainer_s: float
    fit_to_first_step_s: float


def run_pretrain(config: Config, manifest: str, output: str, work: Workload) -> PretrainRun:
    """One `pipeline.train.pretrain` call, timed, with its start-up split."""
    from pipeline.train import pretrain

    with timed_build_trainer() as spans:
        start = time.perf_counter()
        result = pretrain(config, manifest, output, run_name="bench")
        call_s = time.perf_counter() - start
    assert result.steps == work.pretrain_steps, f"trained {result.steps} of {work.pretrain_steps} steps"
    first_time = min(
        (h["first_step_time"] for h in result.history if "first_step_time" in h), default=math.nan
    )
    built = spans[-1][1] if spans else math.nan
    run = PretrainRun(
        steady=steady_rate(result.history, work.steady_after),
        loop=result.images_per_s,
        call=work.pretrain_steps * work.batch / call_s,
        call_s=call_s,
        first_step_s=result.first_step_seconds if result.first_step_seconds is not None else math.nan,
        build_trainer_s=spans[-1][1] - spans[-1][0] if spans else math.nan,
        fit_to_first_step_s=first_time - built,
    )
    log.info("pretrain %s: %s", output, run)
    return run


def pipeline_rows(rows: Rows, tmp: str, work: Workload, device: torch.device) -> None:
    """Curate the JPEGs (on a Ray of its own), then pretrain streamed and cached on a fresh Ray."""
    import ray

    from pipeline.curate import curate

    overrides = [
        f"pretrain.steps={work.pretrain_steps}",
        f"pretrain.log_every={work.log_every}",
        f"pretrain.eval_every={work.pretrain_steps}",  # one report and one checkpoint, at the end
        f"pretrain.checkpoint_every={work.pretrain_steps}",
        "pretrain.val_images=0",  # no validation pass inside the timed steps
        f"pretrain.warmup_steps={min(20, work.pretrain_steps // 2)}",
        "pretrain.num_workers=1",
        "ray.include_dashboard=false",
        "score.method=none",
        f"data.input={os.path.join(tmp, 'images')}",
        f"output={os.path.join(tmp, 'curated')}",
    ]
    config = make_config(work, device, overrides)
    start_ray(work)
    try:
        with timed_log("curate"):
            curated = curate(config)
    finally:
        ray.shutdown()
    kept = int(curated.manifest["kept"].sum())
    rows.add("pipeline_kept_images", kept)
    ray_start_s = start_ray(work)
    try:
        runs = {}
        for name, cache_mib in (("streamed", 0), ("cached", work.cache_mib)):
            run_config = config.model_copy(deep=True)
            run_config.pretrain.cache_decoded_mib = cache_mib
            runs[name] = run_pretrain(
                run_config, curated.manifest_url, os.path.join(tmp, f"pretrain-{name}"), work
            )
            run = runs[name]
            prefix = f"pretrain_{name}"
            rows.add(f"{prefix}_steady_images_per_s", run.steady)
            rows.add(f"{prefix}_loop_images_per_s", run.loop)
            rows.add(f"{prefix}_call_images_per_s", run.call)
            rows.add(f"{prefix}_call_s", run.call_s)
            rows.add(f"{prefix}_first_step_s", run.first_step_s)
            rows.add(f"{prefix}_build_trainer_s", run.build_trainer_s)
            rows.add(f"{prefix}_fit_to_first_step_s", run.fit_to_first_step_s)
    finally:
        ray.shutdown()
    streamed = runs["streamed"]
    rows.add("startup_ray_start_s", ray_start_s)
    rows.add("startup_build_trainer_s", streamed.build_trainer_s)
    rows.add("startup_fit_to_first_step_s", streamed.fit_to_first_step_s)
    # as `maskdiet pretrain` meets it: its own Ray's start, then the call to the first step
    rows.add("time_to_first_step_s", ray_start_s + streamed.first_step_s)


# ---------------------------------------------------------------------------------------------- run


def run(
    quick: bool = False, device: str | None = None, emit: Callable[[Row], None] | None = None
) -> list[Row]:
    """All rows of the benchmark (each also passed to `emit` as it is measured); one skip row without CUDA
    unless `device` (or MASKDIET_BENCH_FORCE_CPU) asks for the CPU."""
    chosen = choose_device(device)
    if chosen is None:
        log.warning("skipped: no CUDA (--device cpu runs the whole path on the CPU with tiny sizes)")
        if emit:
            emit(SKIP_ROW)
        return [SKIP_ROW]
    work = workload(chosen, quick)
    rows = Rows(emit)
    peak = spec_peak_tflops(torch.cuda.get_device_name(chosen)) if chosen.type == "cuda" else None
    log.info("device %s, spec peak %s TFLOP/s, workload %s", chosen, peak, work)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="maskdiet-bench-gpu-") as tmp:
        with timed_log("writing the JPEGs"):
            paths = write_jpegs(os.path.join(tmp, "images"), work)
        matmul = rows.add("matmul_tflops", matmul_tflops(chosen, work.matmul_n, work.matmul_iters))
        if peak is not None:
            rows.add("spec_peak_tflops", peak)
            rows.add("matmul_fraction_of_spec", matmul / peak)
        rows.add("bare_batch", work.batch)
        rows.add("bare_image_px", work.image_px)
        bare = dataloader = math.nan
        # One static graph per mask ratio, as a constant-ratio `pretrain` compiles: without this, the second
        # ratio's visible-patch count would make Dynamo recompile with a dynamic size.
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            for index, (key, name) in enumerate(work.models):
                with timed_log(f"bare step {key} ({name})"):
                    rig = build_rig(work, name, chosen)
                    rate = bare_rows(rows, key, rig, work, matmul, peak)
                if index == 0:  # the model `pretrain` trains: the baseline feeds its compiled step
                    bare = rate
                    workers = max(1, cores - 2)
                    with timed_log("DataLoader baseline"):
                        dataloader = rows.add(
                            "dataloader_steady_images_per_s", dataloader_rate(rig, paths, work, workers)
                        )
                    rows.add("dataloader_workers", workers)
                    rows.add("dataloader_vs_bare", ratio(dataloader, bare))
                del rig
                gc.collect()
                if chosen.type == "cuda":
                    torch.cuda.empty_cache()
        rows.add("pipeline_images", len(paths))
        rows.add("pretrain_steps", work.pretrain_steps)
        pipeline_rows(rows, tmp, work, chosen)
    value = rows.value
    for name in ("streamed", "cached"):
        steady = value[f"pretrain_{name}_steady_images_per_s"]
        rows.add(f"pretrain_{name}_vs_bare", ratio(steady, bare))
        rows.add(f"pretrain_{name}_vs_dataloader", ratio(steady, dataloader))
    return rows.rows


def main() -> None:
    """`python -m benchmarks.gpu_pretrain`: `benchmarks.common.main`'s options plus `--device`; rows print as
    they are measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and images")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cpu: the whole path on the CPU with tiny sizes (default: CUDA if present, else one skip row)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose:
        for name in ("__main__", "benchmarks", "pipeline", "stages"):
            logging.getLogger(name).setLevel(logging.INFO)
    run(args.quick, args.device, emit=lambda row: print_rows([row]))


if __name__ == "__main__":
    main()
