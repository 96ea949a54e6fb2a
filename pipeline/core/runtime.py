"""Start a local Ray or connect to a cluster: the one place that calls `ray.init`.

`ray.init()` with no address joins whatever cluster `/tmp/ray/ray_current_cluster` names, even a dead one,
so a local instance is always started with `address="local"`; we connect only to an explicit address or to
the `RAY_ADDRESS` that a Ray job sets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.data

from pipeline.core.config import RayConfig
from pipeline.core.ray_compat import (
    AUTH_SETUP_LOGGER,
    DATA_PROGRESS_LOGGER,
    ExecutionCallback,
    executor_operators,
    in_task_output_backpressure,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Use the running Ray if there is one, else start/connect per `config`; shut down only what we started.
    Ray Data's context is set once Ray is up: its profile depends on the cluster's size."""
    if ray.is_initialized():
        configure_data_context(config)
        yield
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        log.info("starting a local Ray (num_cpus=%s)", config.num_cpus or os.cpu_count())
        start_local_ray(
            num_cpus=config.num_cpus, num_gpus=config.num_gpus, include_dashboard=config.include_dashboard
        )
    try:
        configure_data_context(config)
        yield
    finally:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray 2.60 logs, at every start of a local Ray, that token authentication is on (its default) and how to turn
# it off. For the instance a maskdiet command starts for itself that is nothing to act on, so it is dropped;
# Ray's warning that authentication is *off* still shows.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # see start_local_ray


def _auth_enabled_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def start_local_ray(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = True,
    object_store_memory: int | None = None,
) -> None:
    """Start a new local Ray (never joining a stale one), with environment variables for Ray's own processes.

    - `RAY_API_SERVER_ADDRESS`, the dashboard pinned: Ray Train's placement-group cleaner (it frees the
      workers of a run that Tune stopped early) asks the State API whether the Train controller lives;
      without the variable it picks the newest Ray on the machine, which is another cluster whenever two run
      side by side (a test session and a `ray start` head, say): early-stopped trials then leak their CPUs.
    - `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0` (unless set): Ray Train watches for nodes being drained
      (spot instances reclaimed); a one-machine Ray has none, and the watcher actor's start printed a C++
      error line into every pretraining run's output.

    Ray's processes inherit the variables at start; this process drops them again (the first would override
    the address of job clients).
    """
    port = _free_port() if include_dashboard else None
    for_ray = {PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0")}
    if port:
        for_ray["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    auth_log = logging.getLogger(AUTH_SETUP_LOGGER)
    auth_log.addFilter(_auth_enabled_notice)
    try:
        with environment(for_ray):
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=include_dashboard,
                dashboard_port=port,
                object_store_memory=object_store_memory,
                logging_level=logging.WARNING,
            )
    finally:
        auth_log.removeFilter(_auth_enabled_notice)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in this process's environment for the duration (processes started inside inherit them),
    then the previous values restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cluster_cpus() -> float:
    """CPUs the connected cluster has in total."""
    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


# Transient object-store errors (as raised through s3fs/aiobotocore and pyarrow) that Ray Data retries.
RETRIED_IO_ERRORS = (
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "503",
    "500 Internal Server Error",
    "Connection was closed",
    "ConnectionError",
    "Read timeout",
    "Connect timeout",
    "ServerDisconnectedError",
    "ClientPayloadError",
)


def is_transient(error: BaseException) -> bool:
    """Whether `error` is a transient object-store failure worth another try (matched on its type name and
    message, since s3fs, aiobotocore and pyarrow each raise their own types for the same failures)."""
    if isinstance(error, FileNotFoundError):
        return False
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in RETRIED_IO_ERRORS)


def retry_pause(attempt: int) -> float:
    """Seconds to wait before retry `attempt + 1` (0.5 s, doubling)."""
    return 0.5 * 2**attempt


@dataclass(frozen=True)
class DataProfile:
    """Ray Data settings that suit a cluster of one size and hurt at another."""

    name: str
    # Ray Data reserves CPUs per operator so no operator starves. On 2 CPUs that held maskdiet's one fused
    # read+decode operator to half the CPUs (a 2,000-JPEG training pass: 1.4 s against 0.8 s without it;
    # scoring ran one task at a time for its first second). On a large cluster the reservation is what keeps
    # a multi-operator pipeline flowing, so it stays on there.
    op_resource_reservation: bool


DATA_PROFILES = {
    "small": DataProfile("small", op_resource_reservation=False),
    "large": DataProfile("large", op_resource_reservation=True),  # Ray's own defaults
}


def choose_data_profile(config: RayConfig | None = None) -> DataProfile:
    """`ray.data_profile`, with "auto" decided from the connected cluster (this machine when Ray is not up):
    small when it has at most `ray.small_cluster_cpus` CPUs and no GPU."""
    config = config or RayConfig()
    name = config.data_profile
    if name == "auto":
        if ray.is_initialized():
            cpus, gpus = cluster_cpus(), cluster_gpus()
        else:
            cpus, gpus = float(os.cpu_count() or 1), 0.0
        name = "small" if cpus <= config.small_cluster_cpus and gpus == 0 else "large"
    return DATA_PROFILES[name]


def configure_data_context(config: RayConfig | None = None, show_progress: bool = False) -> DataProfile:
    """Set Ray Data's per-driver context: our own progress display instead of Ray's, retries for transient
    object-store errors, and the settings of the cluster's size profile (returned). Ray Data ships this
    context to every task it runs; a dataset takes a copy of it when it is built."""
    profile = choose_data_profile(config)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = show_progress
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.retried_io_errors = sorted(set(ctx.retried_io_errors) | set(RETRIED_IO_ERRORS))
    ctx.op_resource_reservation_enabled = profile.op_resource_reservation
    if IdleWait not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, IdleWait]
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger(DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    log.info("Ray Data profile: %s", profile.name)
    return profile


class IdleWait(ExecutionCallback):
    """Pause Ray Data's scheduling loop for `SECONDS` after a step in which no running task can progress.

    Ray Data 2.60's loop blocks in `ray.wait` (up to 100 ms) for its running tasks. When a slow consumer
    holds the pipeline in backpressure, the running tasks have output ready that the loop may not read, so
    `ray.wait` returns at once and the loop spins: streaming pretraining on CPU, the executor (in Train's
    split coordinator) took over half a core and training ran 2.7× slower (45 against 120 images/s on 2
    cores). The pause applies only while every running task is held that way (or none runs); the consumer
    still takes queued blocks at once, and a task's launch waits at most `SECONDS`."""

    SECONDS = 0.02

    def on_execution_step(self, executor: Any) -> None:
        operators = executor_operators(executor)
        if not operators or all(op.has_completed() for op in operators):  # the last step: no pause
            return
        running = [op for op in operators if op.num_active_tasks()]
        if all(in_task_output_backpressure(op) for op in running):
            time.sleep(self.SECONDS)
