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
from typing import Any

import ray
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipeline.core.config import RayConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """Use the running Ray if there is one, else start/connect per `config`; shut down only what we started."""
    configure_data_context()
    if ray.is_initialized():
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
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
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
    auth_log = logging.getLogger(AUTH_LOGGER)
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


def configure_data_context(show_progress: bool = False) -> None:
    """Set Ray Data's per-driver context: our own progress display instead of Ray's, and retries for
    transient object-store errors. Ray Data ships this context to every task it runs."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = show_progress
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.retried_io_errors = sorted(set(ctx.retried_io_errors) | set(RETRIED_IO_ERRORS))
    if IdleWait not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, IdleWait]
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Its one warning says that Ray's progress bars are off, which they are on purpose.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


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
        topology = getattr(executor, "_topology", None)  # private in 2.60: without it, do nothing
        if not topology or all(op.has_completed() for op in topology):  # the last step: no pause
            return
        running = [op for op in topology if op.num_active_tasks()]
        if all(getattr(op, "_in_task_output_backpressure", False) for op in running):
            time.sleep(self.SECONDS)
