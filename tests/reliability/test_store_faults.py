"""Object-store faults: curate through a flaky S3 endpoint still finishes with the fault-free manifest; a
missing bucket or bad credentials is one clear line and a non-zero exit, never a traceback wall."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.demo_data import DemoSpec, write_demo_data
from stages.manifest import read_table

runner = CliRunner()


def _curate(input_url: str, output_url: str, endpoint: str) -> str:
    result = runner.invoke(
        app,
        [
            "curate",
            "-i",
            input_url,
            "-o",
            output_url,
            "--score",
            "none",
            "--set",
            f"data.storage_options.endpoint_url={endpoint}",
            "--set",
            "data.read_batch_size=8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def _outcome(url: str, endpoint: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    so = {"endpoint_url": endpoint}
    manifest, _ = read_table(f"{url}/manifest.parquet", so)
    quarantine, _ = read_table(f"{url}/quarantine.parquet", so)
    return manifest, quarantine


def test_curate_through_faults_equals_fault_free(ray_cluster: None, s3_bucket: str, fault_proxy) -> None:
    """500 InternalError, 503 SlowDown, dropped connections and slow answers on a fifth of all requests (list,
    read, write): botocore/s3fs and Ray Data retry, and the result equals a fault-free run's."""
    data = f"{s3_bucket}/images"
    write_demo_data(data, DemoSpec(per_class=4, bad=4, seed=3))  # straight to moto: 40 images, 4 bad files
    t0 = time.perf_counter()
    _curate(data, f"{s3_bucket}/clean", fault_proxy.url)
    print("clean", time.perf_counter() - t0)
    clean_requests = fault_proxy.policy.counts["requests"]
    fault_proxy.policy.rate = 0.2
    fault_proxy.policy.slow_seconds = 0.3
    t0 = time.perf_counter()
    _curate(data, f"{s3_bucket}/faulty", fault_proxy.url)
    print("faulty", time.perf_counter() - t0, fault_proxy.policy.counts)
    counts = fault_proxy.policy.counts
    assert all(counts[kind] > 0 for kind in ("500", "503", "drop", "slow")), counts
    fault_proxy.policy.rate = 0.0
    clean_manifest, clean_quarantine = _outcome(f"{s3_bucket}/clean", fault_proxy.url)
    manifest, quarantine = _outcome(f"{s3_bucket}/faulty", fault_proxy.url)
    assert len(clean_manifest) == 40 and len(clean_quarantine) == 4
    pd.testing.assert_frame_equal(manifest, clean_manifest)
    pd.testing.assert_frame_equal(quarantine, clean_quarantine)
    assert counts["requests"] > clean_requests  # the faulty run did go through the proxy


# ---------------------------------------------------------------------------------------------- clear errors


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`maskdiet ARGS` as a user runs it, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def _assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) <= 3, text  # one error line (rich may wrap a long URL once)
    for needle in needles:
        assert needle in " ".join(lines), text


def test_missing_bucket_is_one_clear_line(s3_server: str, tmp_path) -> None:
    done = _cli(["curate", "-i", "s3://no-such-bucket-4711/train", "-o", str(tmp_path / "o")], {})
    _assert_one_line_error(done, "no-such-bucket-4711", "not found")


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[str]:
    """A second moto server that checks credentials (IAM auth on from the first request), in its own
    process: a bucket endpoint that rejects unknown keys as AWS does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_credentials_are_one_clear_line(strict_s3: str, tmp_path) -> None:
    done = _cli(
        ["curate", "-i", "s3://team-images/train", "-o", str(tmp_path / "o")],
        {
            "AWS_ENDPOINT_URL": strict_s3,
            "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0",
            "AWS_SECRET_ACCESS_KEY": "wrong-secret-do-not-print",
        },
    )
    _assert_one_line_error(done, "access denied", "s3://team-images/train")
    assert "wrong-secret-do-not-print" not in done.stdout + done.stderr
