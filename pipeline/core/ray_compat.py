"""Every use of a Ray private API, in one place.

Each name below reaches into Ray's internals (a module under `_private` / `_internal`, a private attribute,
a logger named after an internal file) because no public API does the job. Each was checked on
`RAY_VERSION_CHECKED`; `tests/pipeline/core/test_ray_compat.py` fails loudly, naming the entry, when a Ray
upgrade moves or renames one. Code elsewhere imports these names, never a Ray private path.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

RAY_VERSION_CHECKED = "2.60.0"

# Ray Data's hook into its scheduling loop (`on_execution_step(executor)`), installed through the public
# `DataContext.custom_execution_callback_classes`; the base class itself is internal.
__all__ = [
    "AUTH_SETUP_LOGGER",
    "DATA_PROGRESS_LOGGER",
    "PG_CLEANER_CALLBACK",
    "RAY_VERSION_CHECKED",
    "TRAIN_CONTEXT_MODULE",
    "ExecutionCallback",
    "executor_operators",
    "in_task_output_backpressure",
    "quiet_train_report_lines",
    "without_callback",
]

# Logs, at every local Ray start, that token authentication is on (see runtime.start_local_ray).
AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray Data's progress module: its one warning says Ray's progress bars are off, which they are on purpose.
DATA_PROGRESS_LOGGER = "ray.data._internal.progress"

# Ray Train V2's worker-side context: it logs a line for every `ray.train.report` through a logger named
# after its file path, which `LoggingConfig`'s filter (names under `ray.train`) does not reach.
TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"


# Ray Train V2 adds, among its default callbacks (built by the trainer's private `_create_default_callbacks`),
# one that starts a detached PlacementGroupCleaner per run. It polls the State API every second to see
# whether the controller died; with no dashboard there is no State API, and every poll logs a warning (51
# lines in a 90 s run on a GPU machine) while cleaning nothing.
PG_CLEANER_CALLBACK = "PlacementGroupCleanerCallback"


def without_callback(callbacks: list[Any], class_name: str) -> list[Any]:
    """`callbacks` less those of class `class_name` (unchanged when this Ray has none of that name)."""
    return [c for c in callbacks if type(c).__name__ != class_name]


def executor_operators(executor: Any) -> list[Any] | None:
    """The physical operators of a running Ray Data `StreamingExecutor` (its private `_topology`), or None
    when this Ray keeps them elsewhere (the caller then does nothing)."""
    topology = getattr(executor, "_topology", None)
    return list(topology) if topology else None


def in_task_output_backpressure(operator: Any) -> bool:
    """Whether Ray Data holds `operator`'s running tasks because their output may not be taken yet (the
    private flag its backpressure policy sets; False when this Ray has no such flag)."""
    return bool(getattr(operator, "_in_task_output_backpressure", False))


def quiet_train_report_lines(level: str) -> None:
    """Apply `level` to the line Ray Train logs on each worker for every report (see TRAIN_CONTEXT_MODULE);
    with another Ray layout there is nothing to adjust."""
    try:
        module = importlib.import_module(TRAIN_CONTEXT_MODULE)
    except ImportError:
        return
    logging.getLogger(module.__file__).setLevel(level)
