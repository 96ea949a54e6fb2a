"""Proxy training throughput: maskdiet's streamed proxy tasks vs plain torch loops, same models and images.

Workload: `N` images (S×S×3 uint8, S = 32, fixed-seed pixels and labels over 10 classes; training speed
does not depend on what they show), K = 2 `cnn-small` proxies (seeds 0 and 1) trained for `epochs` epochs
with the default scoring settings (batch 64, SGD lr 0.1, momentum 0.9 Nesterov, weight decay 5e-4,
±2 px `random_shift` augmentation) — the proxy training that `maskdiet curate --score el2n` runs before
scoring. A smaller row does the same with `resnet18` (the CIFAR stem at 32 px) over fewer images and one
epoch, since a ResNet-18 trains at tens of images/s per core here.

- maskdiet: `stages.score.train_proxies` on a local Ray with 2 CPUs, `score.cpus_per_model` = cores / K, so
  the K proxies run in parallel as Ray tasks, each streaming windows of chunks from the object store
  (`stages.pixels.ChunkWindows`; the pixels are put there once before the timing, as curate leaves them),
  counting forgetting events, then recalibrating BatchNorm with one forward pass over every image.
- baseline: K persistent processes (a `ProcessPoolExecutor` started and warmed before the timing, the
  images given to each once, as a DataLoader's persistent workers hold theirs), each training one model
  with cores / K torch threads: a plain loop over a fresh permutation per epoch, `to_input` and
  `random_shift` per batch, the same SGD, then the same BatchNorm recalibration pass (the same work on the
  images, none of maskdiet's machinery: no Ray, no chunks, no forgetting bookkeeping). Processes in
  parallel rather than K models one after another with cores threads each, because that is the faster of
  the two here and so the fairer bar: a 32 px `cnn-small` batch is too small for intra-op threads (one
  thread trained 6,100 images/s, two threads 1,240 on this shared 2-core box; ResNet-18 27 vs 13).
  The `_train_only` rows time the baseline's epochs without the recalibration pass (each process's own
  clock, the slower of the K per pass), for a reader who counts that pass as maskdiet's overhead.

- maskdiet as Ray Train jobs (`score.trainer=train`, cnn-small only): the same `train_proxies` with a
  `ProxyJobs` in a fresh temporary folder per pass: a Train run per proxy, a checkpoint after every epoch.
  Its ratio carries each job's start-up (controller, worker group) and checkpoints; no target.

Images/s is K × epochs × N over a pass's wall time, on both sides. Passes alternate, after one untimed
warm-up of each (the first maskdiet pass imports torch in fresh Ray workers: `proxy_first_pass_s`); medians
are reported. Target: maskdiet ≥ 0.9× the loops.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/proxy_throughput.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging
import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Row, local_ray, main, ratio, tiny
from pipeline.core.config import ScoreConfig
from pipeline.models.proxy import ProxySpec, random_shift, to_input
from stages.pixels import PixelChunks
from stages.proxy_jobs import ProxyJobs
from stages.score import train_proxies

log = logging.getLogger(__name__)

# The target (read by run_all.py): proxy training at ≥ 0.9× a plain torch loop.
TARGETS = {
    "proxy_train_ratio_vs_torch_loop": (">=", 0.9),
    "proxy_resnet18_train_ratio_vs_torch_loop": (">=", 0.9),
}

K = 2
SIZE = 32
CLASSES = 10


@dataclass(frozen=True)
class Workload:
    """One model's measurement: how many of the images, epochs and timed passes per side."""

    model: str
    images: int
    epochs: int
    repeats: int


def workloads(quick: bool) -> list[Workload]:
    """cnn-small (the target row), then resnet18 (smaller: it is ~200× slower per image on CPU)."""
    if tiny():
        return [Workload("cnn-small", 64, 1, 1), Workload("resnet18", 16, 1, 1)]
    if quick:
        return [Workload("cnn-small", 8_000, 2, 2), Workload("resnet18", 256, 1, 2)]
    return [Workload("cnn-small", 20_000, 2, 3), Workload("resnet18", 512, 1, 3)]


def _inputs(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=n).astype(np.int64)
    return images, labels


def spec_for(work: Workload, threads: int) -> tuple[ProxySpec, ScoreConfig]:
    """The proxies' spec and scoring config: defaults, but this model, epochs and CPUs per proxy."""
    config = ScoreConfig(model=work.model, epochs=work.epochs, num_models=K, cpus_per_model=threads)
    return ProxySpec.from_config(config, CLASSES, image_size=SIZE), config


# ---------------------------------------------------------------------------------------------- baseline

_HELD: dict[str, Any] = {}  # in each baseline process: the images and labels (given once), the barrier


def _hold(images: np.ndarray, labels: np.ndarray, barrier: Barrier) -> None:
    """Pool initializer: keep the images in this process's memory for every pass."""
    _HELD.update(images=images, labels=labels, barrier=barrier)


def warm_train(n: int, spec: ProxySpec, seed: int) -> None:
    """A warm-up job: `plain_train`, then wait for the other processes' jobs, so that each of the K
    processes runs one (a process that finished first cannot take a second while it waits) and every
    process has built this model before the timing."""
    plain_train(n, spec, seed)
    _HELD["barrier"].wait(timeout=600)


def plain_train(n: int, spec: ProxySpec, seed: int) -> tuple[float, float, float]:
    """The baseline for one model, in a pool process: train on the first `n` held images for `spec.epochs`
    epochs, then recalibrate BatchNorm as `pipeline.models.proxy.recompute_batchnorm` does. Returns
    (training seconds, recalibration seconds, last epoch's mean loss)."""
    torch.set_num_threads(spec.threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, y_all = _HELD["images"][:n], torch.from_numpy(_HELD["labels"][:n])
    model = spec.build()
    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=0.9, nesterov=True, weight_decay=spec.weight_decay
    )
    start = time.perf_counter()
    model.train()
    mean = math.nan
    for _ in range(spec.epochs):
        total, count = torch.zeros(()), 0
        perm = torch.randperm(n, generator=gen).numpy()
        for s in range(0, n, spec.batch_size):
            idx = perm[s : s + spec.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = to_input(images[idx])
            if spec.augment:
                x = random_shift(x, gen)
            y = y_all[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
            count += len(idx)
        mean = float(total) / max(count, 1)
    trained = time.perf_counter()
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        for s in range(0, n, spec.batch_size):
            if min(n, s + spec.batch_size) - s > 1:
                model(to_input(images[s : s + spec.batch_size]))
        for m in norms:
            m.momentum = 0.1
    return trained - start, time.perf_counter() - trained, mean


def plain_warmup(pool: ProcessPoolExecutor, n: int, spec: ProxySpec) -> None:
    """Untimed: each pool process trains this model once (`warm_train`)."""
    for future in [pool.submit(warm_train, n, spec, seed) for seed in range(K)]:
        future.result()


def plain_pass(pool: ProcessPoolExecutor, n: int, spec: ProxySpec) -> tuple[float, float]:
    """One baseline pass: the K models at once, one per pool process. Returns (wall seconds, the slowest
    process's training seconds without the recalibration)."""
    start = time.perf_counter()
    outs = [f.result() for f in [pool.submit(plain_train, n, spec, seed) for seed in range(K)]]
    wall = time.perf_counter() - start
    log.info("torch loop: %.2f s (train %s, recalibrate %s)", wall, *zip(*[o[:2] for o in outs], strict=True))
    return wall, max(o[0] for o in outs)


# ---------------------------------------------------------------------------------------------- measure


def measure(
    work: Workload, pool: ProcessPoolExecutor, images: np.ndarray, labels: np.ndarray, cores: int
) -> dict[str, float]:
    """Alternating timed passes of maskdiet and the loops for one model; medians as images/s."""
    spec, config = spec_for(work, max(1, cores // K))
    n = work.images
    pixels = PixelChunks.from_array(images[:n], config.chunk_rows)  # as curate leaves them
    seeds = list(range(K))
    seconds: dict[str, list[float]] = {"maskdiet": [], "loop": [], "loop_train": []}

    def timed_maskdiet() -> float:
        start = time.perf_counter()
        results = train_proxies(pixels, labels[:n], spec, seeds, config)
        wall = time.perf_counter() - start
        log.info("maskdiet %s: %.2f s, losses %s", work.model, wall, [r.losses[-1] for r in results])
        return wall

    def timed_loop() -> None:
        wall, train = plain_pass(pool, n, spec)
        seconds["loop"].append(wall)
        seconds["loop_train"].append(train)

    def timed_jobs() -> None:
        """The same training as Ray Train jobs (`score.trainer=train`), each pass into fresh storage (a
        finished job's storage would hand its result back at once)."""
        with tempfile.TemporaryDirectory() as storage:
            jobs = ProxyJobs(storage=storage, rows="benchmark", max_failures=0, state_api=True)
            start = time.perf_counter()
            train_proxies(pixels, labels[:n], spec, seeds, config, jobs=jobs)
            seconds["jobs"].append(time.perf_counter() - start)

    first = timed_maskdiet()  # fresh workers the first time (torch imported there)
    plain_warmup(pool, n, spec)  # the pool's processes have started and built this model
    steps: list[Callable[[], None]] = [timed_loop, lambda: seconds["maskdiet"].append(timed_maskdiet())]
    if work.model == "cnn-small":  # the jobs' start-up is what differs; resnet18's passes are long already
        seconds["jobs"] = []
        steps.append(timed_jobs)
    for _ in range(work.repeats):
        for step in steps:
            step()
    log.info("%s seconds per pass: %s", work.model, seconds)
    work_images = K * work.epochs * n
    rate = {name: work_images / float(np.median(s)) for name, s in seconds.items()}
    return {**rate, "first_pass_s": first}


def run(quick: bool = False) -> list[Row]:
    cores = os.cpu_count() or 1
    plan = workloads(quick)
    images, labels = _inputs(max(w.images for w in plan))
    rows: list[Row] = []
    context = multiprocessing.get_context("spawn")  # not fork: the parent has torch's threads running
    held = (images, labels, context.Barrier(K))
    with (
        ProcessPoolExecutor(K, mp_context=context, initializer=_hold, initargs=held) as pool,
        local_ray(cores),
    ):
        for work in plan:
            rate = measure(work, pool, images, labels, cores)
            prefix = "proxy" if work.model == "cnn-small" else f"proxy_{work.model.replace('-', '_')}"
            rows += [
                (f"{prefix}_images", float(work.images)),
                (f"{prefix}_epochs", float(work.epochs)),
                (f"{prefix}_images_per_s_maskdiet", rate["maskdiet"]),
                (f"{prefix}_images_per_s_torch_loop", rate["loop"]),
                (f"{prefix}_train_ratio_vs_torch_loop", ratio(rate["maskdiet"], rate["loop"])),
                (f"{prefix}_images_per_s_torch_loop_train_only", rate["loop_train"]),
                (
                    f"{prefix}_train_ratio_vs_torch_loop_train_only",
                    ratio(rate["maskdiet"], rate["loop_train"]),
                ),
                (f"{prefix}_first_pass_s", rate["first_pass_s"]),
            ]
            if "jobs" in rate:
                rows += [
                    (f"{prefix}_jobs_images_per_s_maskdiet", rate["jobs"]),
                    (f"{prefix}_jobs_train_ratio_vs_torch_loop", ratio(rate["jobs"], rate["loop"])),
                ]
    rows += [("proxy_models", float(K)), ("proxy_cores", float(cores))]
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
