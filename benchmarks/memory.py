"""Memory: peak memory of `maskdiet curate --score none` over a small and a 4× larger image folder.

Curation streams: the driver keeps one metadata row per image (path, hash, label), not pixels, so memory
should stay nearly flat as the input grows. Workload: 5,000 vs 20,000 demo digits (32² px, half PNG, half
JPEG) decoded at 32² px.

How it is measured: each size runs the real command line (`python -m pipeline.cli curate ...`) in a child
process that starts its own local Ray (2 CPUs, dashboard off). A sampler here walks the
child's whole process tree every 0.2 s — the CLI driver, Ray's GCS, raylet and every Ray worker —
and sums each process's PSS (proportional set size: a shared page, such as Ray's object store, is split
among the processes that map it, so nothing is counted twice) and RSS (which counts shared pages once per
process, so it over-states). The peak of the sum is reported, with the driver's own peak RSS. Target:
large / small peak PSS < 1.5.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/memory.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time

import psutil

from benchmarks.common import RAY_START_TIMEOUT, PeakMemory, Row, main, ratio, terminate, tiny
from pipeline.demo_data import DemoSpec, write_demo_data

log = logging.getLogger(__name__)

# The target (read by run_all.py): peak memory grows less than 1.5x for 4x the images.
TARGETS = {"memory_curate_pss_growth_large_vs_small": ("<", 1.5)}

MB = 1_000_000


def workload(quick: bool) -> tuple[int, int]:
    """(small, large) image counts."""
    if tiny():
        return 100, 400
    return 5000, 20000


def write_digits(url: str, count: int, size: int = 32) -> None:
    """`count` demo digits (10 classes, `size`² px, PNG and JPEG alternating) under `url`."""
    write_demo_data(url, DemoSpec(sources=("digits",), per_class=max(1, count // 10), size=size, seed=0))


class DriverPeak:
    """The largest RSS seen for one process (the CLI driver), sampled alongside the tree."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0.0

    def sample(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            self.peak = max(self.peak, float(self.process.memory_info().rss))


def curate_peak(images: str, output: str, options: tuple[str, ...] = ("--score", "none")) -> dict[str, float]:
    """Run `maskdiet curate` (by default `--score none`; `options` replaces that) in a child process; its
    tree's peak PSS/RSS and wall seconds."""
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "curate",
        "--input",
        images,
        "--output",
        output,
        *options,
        "--set",
        "ray.num_cpus=2",
        "--set",
        "ray.include_dashboard=false",  # no Tune here; the dashboard only adds start-up time
    ]
    env = {**os.environ, "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
    for attempt in range(1, 6):
        start = time.perf_counter()
        child = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        driver = DriverPeak(child.pid)
        with PeakMemory(child.pid, interval=0.2) as tree:
            while child.poll() is None:
                driver.sample()
                time.sleep(0.2)
        _, stderr = child.communicate()
        seconds = time.perf_counter() - start
        if child.returncode == 0:
            break
        terminate([p for p in tree.seen.values() if p.is_running()])  # a failed start's orphans
        if RAY_START_TIMEOUT not in stderr or attempt == 5:
            raise RuntimeError(f"curate failed (exit {child.returncode}): {stderr[-2000:]}")
        log.warning("Ray start timed out in the curate child (attempt %d); retrying", attempt)
    log.info("curate of %s: %.1f s, %d samples", images, seconds, tree.samples)
    return {"pss": tree.peak_pss, "rss": tree.peak_rss, "driver": driver.peak, "seconds": seconds}


def growth_rows(
    prefix: str, counts: tuple[int, int], size: int = 32, options: tuple[str, ...] = ("--score", "none")
) -> list[Row]:
    """`curate_peak` over a small and a large folder of `size`² px digits (`counts`), each size's rows and
    the large / small growth, named `<prefix>_...`."""
    rows: list[Row] = []
    peaks: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix=f"maskdiet-bench-{prefix}-") as tmp:
        for name, count in zip(("small", "large"), counts, strict=True):
            images = os.path.join(tmp, f"images-{name}")
            write_digits(images, count, size=size)
            peaks[name] = curate_peak(images, os.path.join(tmp, f"out-{name}"), options)
            rows += [
                (f"{prefix}_{name}_images", float(count)),
                (f"{prefix}_{name}_peak_pss_mb", peaks[name]["pss"] / MB),
                (f"{prefix}_{name}_peak_rss_mb", peaks[name]["rss"] / MB),
                (f"{prefix}_{name}_driver_peak_rss_mb", peaks[name]["driver"] / MB),
                (f"{prefix}_{name}_seconds", peaks[name]["seconds"]),
            ]
    rows += [
        (f"{prefix}_pss_growth_large_vs_small", ratio(peaks["large"]["pss"], peaks["small"]["pss"])),
        (f"{prefix}_driver_growth_large_vs_small", ratio(peaks["large"]["driver"], peaks["small"]["driver"])),
    ]
    return rows


def run(quick: bool = False) -> list[Row]:
    return growth_rows("memory_curate", workload(quick))


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
