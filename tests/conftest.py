"""Shared fixtures: one real Ray per session, a real S3-compatible server (moto) on 127.0.0.1, demo data.

The S3 fixture sets the standard AWS variables before Ray starts, so Ray's worker processes reach the same
endpoint through s3fs exactly as a user's would.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.common import free_port, moto_s3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free local port; yields its endpoint URL and sets the AWS variables (the same
    server the benchmarks start: `benchmarks.common.moto_s3`)."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket; yields its URL (s3://name)."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[None]:
    """One local Ray for the whole session (2 CPUs, dashboard on: Tune needs its State API)."""
    import ray

    from pipeline.core.runtime import configure_data_context, start_local_ray

    # Ray gives a starting node a fixed 30 s to register (and the dashboard a few more); on a loaded machine
    # either can miss it. A fresh start usually succeeds: try up to three times.
    for attempt in range(3):
        try:
            start_local_ray(num_cpus=2, include_dashboard=True, object_store_memory=1_000_000_000)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    configure_data_context()
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small noisy demo folder with bad files, written once per session (read-only for tests)."""
    from pipeline.demo_data import DemoSpec, write_demo_data

    root = tmp_path_factory.mktemp("demo") / "images"
    write_demo_data(str(root), DemoSpec(per_class=20, noise=0.1, bad=7, seed=1))
    return root


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `ray start --head --block` on 127.0.0.1 (1 CPU, dashboard on); yields its Jobs API URL.

    Every port is a free one, so it never collides with the session `ray_cluster` or with other test runs on
    this machine. `--block` keeps the head's processes in one process group that we started ourselves: the
    fixture ends exactly those (never a bare `ray stop`, which would kill every Ray on the machine).
    """
    import contextlib
    import signal
    import subprocess
    import time

    def start() -> tuple[subprocess.Popen, str, Path]:
        gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = (
            free_port() for _ in range(9)
        )
        log_path = tmp_path_factory.mktemp("ray-head") / "head.log"
        cmd = [
            "ray", "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1", "--object-store-memory=300000000",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONUNBUFFERED"] = "1"  # the log is how we see `ray start` finish
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return proc, f"http://127.0.0.1:{dash}", log_path

    def stop(proc: subprocess.Popen) -> None:
        # SIGTERM lets the head drain briefly; then SIGKILL whatever is left of the process group we started.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)

    from pipeline.ops.jobs import JobsError, connect, list_jobs

    # Ray gives its raylet a fixed 30 s to register; on a loaded machine that can fail: try again.
    for attempt in range(3):
        proc, url, log_path = start()
        deadline = time.monotonic() + 180
        while proc.poll() is None and "block forever" not in log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if proc.poll() is None and time.monotonic() <= deadline:
            break
        stop(proc)
        if attempt == 2:
            raise RuntimeError(f"ray start failed 3 times: {log_path.read_text()[-2000:]}")
    try:
        while True:
            try:
                list_jobs(connect(url))
                break
            except JobsError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1.0)
        yield url
    finally:
        stop(proc)
