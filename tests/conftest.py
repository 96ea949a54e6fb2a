"""Shared fixtures: one real Ray per session, a real S3-compatible server (moto) on 127.0.0.1, demo data.

The S3 fixture sets the standard AWS variables before Ray starts, so Ray's worker processes reach the same
endpoint through s3fs exactly as a user's would.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free local port; yields its endpoint URL and sets the AWS variables."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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

    from pipeline.runtime import configure_data_context

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        object_store_memory=1_000_000_000,
        logging_level="WARNING",
    )
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
