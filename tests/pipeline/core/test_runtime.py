"""Starting Ray and running Ray Data: the scheduling loop must rest, not spin, while a slow consumer holds the
pipeline in backpressure; a local start says nothing the user cannot act on."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import ray.data

from pipeline.core.runtime import PREEMPTION_WATCHER, IdleWait


def _driver_cpu_share(batches: int, seconds_per_batch: float) -> float:
    """This process's CPU time over wall time while a slow loop consumes a stream of 16 MB blocks (enough to
    fill the operator's output budget). `iter_batches` runs the executor in a thread of this process; the
    consumer itself only sleeps."""
    ds = ray.data.range(40, override_num_blocks=40).map_batches(
        lambda b: {"x": np.ones((len(b["id"]), 16, 1024, 1024), dtype=np.uint8)}, batch_size=None
    )
    it = iter(ds.iter_batches(batch_size=1, prefetch_batches=1))
    next(it)
    time.sleep(2.0)  # the pipeline fills up to its backpressure limits
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
        time.sleep(seconds_per_batch)
    share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    for _ in it:  # drain, so the execution ends cleanly
        pass
    return share


def test_scheduling_loop_rests_while_a_slow_consumer_holds_it_back(ray_cluster: None) -> None:
    """Without `IdleWait` the driver spun a whole core here (measured: 1.01 of a core; 0.29 with it)."""
    ctx = ray.data.DataContext.get_current()
    assert IdleWait in ctx.custom_execution_callback_classes  # configure_data_context installs it
    share = _driver_cpu_share(15, 0.1)
    assert share < 0.6, f"the driver used {share:.0%} of a core while the consumer slept"


START = """
import logging, os, ray
from pipeline.core.runtime import PREEMPTION_WATCHER, start_local_ray
logging.basicConfig(level=logging.WARNING)
start_local_ray(num_cpus=1, include_dashboard=False)
print("cpus", ray.cluster_resources()["CPU"])
print("watcher in Ray", ray.get(ray.remote(lambda: os.environ.get(PREEMPTION_WATCHER)).remote()))
print("watcher here", os.environ.get(PREEMPTION_WATCHER))
ray.shutdown()
"""


def test_a_local_start_is_quiet() -> None:
    """Ray 2.60 logged "Token authentication is enabled for this Ray cluster..." at every `maskdiet` command
    that started its own Ray, and Train's preemption watcher (useless on one machine) a C++ error line at
    every pretraining run; its switch must reach Ray's processes. A fresh process, so the start is a real
    one (the test session's Ray is up)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", PREEMPTION_WATCHER)
    }
    done = subprocess.run(
        [sys.executable, "-c", START], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cpus 1.0" in done.stdout
    assert "watcher in Ray 0" in done.stdout and "watcher here None" in done.stdout
    assert "Token authentication is enabled" not in done.stderr + done.stdout
