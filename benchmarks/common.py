"""Shared benchmark helpers: medians of repeats, timers, peak memory of a process tree, machine facts,
a local Ray and a local S3 server, and the `name: value` row format that `run_all.py` parses.

A benchmark returns rows `(name, value)`; names are `snake_case` with units in the name (`_per_s`, `_mb`,
`_s`) and ratios end in `_ratio_vs_<baseline>` or `_fraction_of_<limit>`. Absolute numbers depend on the
machine and on whatever else runs on it; ratios are measured side by side in one run, on the same files
and cores, which is what the targets are stated in.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import platform
import re
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import psutil

Row = tuple[str, float]
T = TypeVar("T")

# Set by tests: shrink every input to a few dozen items so a script runs end to end in seconds.
TINY_ENV = "MASKDIET_BENCH_TINY"

_ROW = re.compile(r"^([A-Za-z0-9_.\-]+): (\S+)(?:\s+#.*)?$")  # `name: value`, maybe `  # note`

log = logging.getLogger(__name__)


def tiny() -> bool:
    """True when the caller asked for tiny inputs (a smoke run, not a measurement)."""
    return os.environ.get(TINY_ENV, "") not in ("", "0")


def ratio(numerator: float, denominator: float) -> float:
    """`numerator / denominator`, NaN when the denominator is zero or not finite."""
    if not math.isfinite(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Seconds of each repeat; `median` is what the tables report."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan


def repeat(fn: Callable[[], object], repeats: int, warmup: int = 0) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; the median damps a noisy machine."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timing.seconds.append(time.perf_counter() - start)
    return timing


@contextlib.contextmanager
def timer(name: str) -> Iterator[Timing]:
    """`with timer("decode") as t:` → `t.seconds[0]` after the block; logs the duration."""
    timing = Timing()
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing.seconds.append(time.perf_counter() - start)
        log.info("%s took %.2f s", name, timing.seconds[0])


# ---------------------------------------------------------------------------------------------- memory


def tree_memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in bytes summed over process `pid` and all its descendants.

    RSS counts a shared page once per process that maps it (Ray's object store is shared memory, so RSS
    over-counts it); PSS splits each shared page among the processes sharing it, so the sum is the tree's
    real footprint. PSS falls back to RSS where /proc/<pid>/smaps is unreadable.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    rss = pss = 0.0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return rss, pss


class PeakMemory:
    """Samples `tree_memory(pid)` on a background thread every `interval` s and keeps the peaks.

    Use as a context manager around the work; read `peak_rss` / `peak_pss` (bytes) after it.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2) -> None:
        self.pid = pid if pid is not None else os.getpid()
        self.interval = interval
        self.peak_rss = 0.0
        self.peak_pss = 0.0
        self.samples = 0
        self.seen: dict[int, psutil.Process] = {}  # every process of the tree seen while sampling
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.pid).children(recursive=True):
                self.seen.setdefault(proc.pid, proc)
        rss, pss = tree_memory(self.pid)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.samples += 1

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, str]:
    """Facts that make a table comparable: CPU, cores, memory, load, and the versions that matter."""
    import numpy
    import PIL
    import ray
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "load_avg_1_5_15": " ".join(f"{x:.2f}" for x in load),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
    }


# ---------------------------------------------------------------------------------------------- rows


def format_value(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:.1f}"
    return f"{value:.4g}"


def print_rows(rows: list[Row], file: object = None) -> None:
    """Print rows as `name: value`, the format `parse_rows` (and `run_all.py`) reads back."""
    out = file or sys.stdout
    for name, value in rows:
        print(f"{name}: {format_value(value)}", file=out, flush=True)  # type: ignore[arg-type]


def parse_rows(text: str) -> list[Row]:
    """Rows from a benchmark's stdout; lines that are not `name: number` are ignored."""
    rows = []
    for line in text.splitlines():
        match = _ROW.match(line.strip())
        if not match:
            continue
        try:
            rows.append((match.group(1), float(match.group(2))))
        except ValueError:
            continue
    return rows


def main(run: Callable[[bool], list[Row]], description: str) -> None:
    """The `__main__` of a benchmark module: parse `--quick`, run, print rows to stdout (logs go to stderr)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small inputs and fewer repeats")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose:  # ours only: botocore and friends are chatty at INFO
        for name in ("__main__", "benchmarks", "pipeline", "stages"):
            logging.getLogger(name).setLevel(logging.INFO)
    print_rows(run(args.quick))


# ---------------------------------------------------------------------------------------------- services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(processes: list[psutil.Process], grace_s: float = 5.0) -> None:
    """Stop these processes (ours: children or descendants we recorded), politely first, then by force."""
    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            alive.append(proc)
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()


# Ray gives a starting node a fixed 30 s to register; on a machine loaded by other work it can miss that.
RAY_START_TIMEOUT = "timed out during startup"


def with_start_retries(start: Callable[[], T], attempts: int = 5) -> T:
    """Call `start` (something that starts Ray processes); retry when Ray's node start-up timed out."""
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            return start()
        except Exception as e:
            if RAY_START_TIMEOUT not in str(e) or attempt == attempts:
                raise
            log.warning("Ray start timed out (attempt %d of %d); retrying", attempt, attempts)
            import ray

            ray.shutdown()
            # A start that timed out can leave its GCS / raylet behind (ray.shutdown does not know them).
            terminate([p for p in psutil.Process().children(recursive=True) if p.pid not in before])
            time.sleep(5.0)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def local_ray(num_cpus: int, object_store_mb: int = 1000) -> Iterator[None]:
    """A fresh local Ray with exactly `num_cpus` CPUs (never joins an existing cluster), shut down after.

    The dashboard stays off: benchmarks do not need the State API and it costs a core-second at start.
    """
    import ray

    from pipeline.core.runtime import configure_data_context

    if ray.is_initialized():
        raise RuntimeError("a benchmark starts its own Ray; one is already running in this process")
    with_start_retries(
        lambda: ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=object_store_mb * 1_000_000,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    )
    configure_data_context()
    try:
        yield
    finally:
        ray.shutdown()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "benchmark-key-id",
    "AWS_SECRET_ACCESS_KEY": "benchmark-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free local port, with the standard AWS variables pointing at it.

    Start it before Ray so Ray's worker processes inherit the endpoint, as a user's would. Yields the
    endpoint URL; the variables are restored afterwards.
    """
    from moto.server import ThreadedMotoServer

    from pipeline.core.runtime import environment

    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with environment({**S3_ENV, "AWS_ENDPOINT_URL": endpoint}):
            yield endpoint
    finally:
        server.stop()


def make_bucket(name: str) -> str:
    """Create bucket `name` on the server the AWS variables point at; returns `s3://name`."""
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"
