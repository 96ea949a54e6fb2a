"""Secrets: credentials given in the environment or in `storage_options` never show up in what a run prints,
logs or writes (manifests' metadata, quarantine, run directories, reports, Ray's own log files)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.storage import url_to_fs
from pipeline.demo_data import DemoSpec, write_demo_data
from tests.tiny import TINY_RUN, as_sets

runner = CliRunner()


def _everything_written(url: str, storage_options: dict) -> dict[str, str]:
    """Every object under `url` as text: raw bytes decoded leniently, plus Parquet key-value metadata and
    rows rendered (the data pages are compressed, so a raw grep alone could miss a value)."""
    fs, root = url_to_fs(url, storage_options)
    texts = {}
    for path in fs.find(root):
        data = fs.cat_file(path)
        text = data.decode("utf-8", errors="replace")
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            meta = table.schema.metadata or {}
            text += "".join(f"{k.decode()}={v.decode()}" for k, v in meta.items())
            text += table.to_pandas().to_csv()
        texts[path] = text
    return texts


def _ray_logs() -> dict[str, str]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return {
        str(p): p.read_text(errors="replace")
        for p in (session / "logs").rglob("*")
        if p.is_file() and p.stat().st_size < 50_000_000
    }


def _secret_config(tmp_path: Path, endpoint: str, key: str, secret: str) -> Path:
    path = tmp_path / "secret-config.yaml"
    path.write_text(
        yaml.safe_dump(
            {"data": {"storage_options": {"key": key, "secret": secret, "endpoint_url": endpoint}}}
        )
    )
    return path


def test_curate_never_leaks_credentials(
    ray_cluster: None, s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"so-{uuid.uuid4().hex}"
    env_secret = f"env-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    write_demo_data(f"{s3_bucket}/img", DemoSpec(per_class=2, bad=3, seed=6))
    config = _secret_config(tmp_path, s3_server, key, secret)
    result = runner.invoke(
        app,
        [
            "curate",
            "-c",
            str(config),
            "-i",
            f"{s3_bucket}/img",
            "-o",
            f"{s3_bucket}/out",
            "--score",
            "none",
            "-v",
        ],
    )
    assert result.exit_code == 0, result.output
    so = {"endpoint_url": s3_server}
    written = _everything_written(f"{s3_bucket}/out", so)
    assert any(p.endswith("manifest.parquet") for p in written) and any(
        "maskdiet.config" in t for t in written.values()
    )
    places = {"printed output": result.output, **written, **_ray_logs()}
    for needle in (secret, env_secret, key):
        leaks = [where for where, text in places.items() if needle in text]
        assert not leaks, f"{needle[:6]}… found in {leaks}"


def test_errors_never_echo_credentials(s3_server: str, tmp_path: Path) -> None:
    """A config error (in any section) and a storage error: the message names the problem, not the secret."""
    secret = f"so-{uuid.uuid4().hex}"
    config = _secret_config(tmp_path, s3_server, "AKIAEXAMPLE", secret)
    for extra in (["--set", "pretrain.mask.schedule=linear"], ["--set", f"data.storage_options={secret}"]):
        result = runner.invoke(app, ["curate", "-c", str(config), "-i", "s3://x/y", *extra])
        assert result.exit_code == 2 and "error:" in result.output and secret not in result.output
    result = runner.invoke(app, ["curate", "-c", str(config), "-i", "s3://no-such-bucket-secrets/x"])
    assert result.exit_code == 2 and "no-such-bucket-secrets" in result.output and secret not in result.output


@pytest.mark.slow
def test_run_never_leaks_credentials(
    ray_cluster: None, s3_server: str, s3_bucket: str, tmp_path: Path
) -> None:
    """`maskdiet run` writes a config copy, summary, metrics and a report: none holds the secret."""
    key, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"so-{uuid.uuid4().hex}"
    write_demo_data(f"{s3_bucket}/img", DemoSpec(per_class=4, bad=2, seed=7))
    config = _secret_config(tmp_path, s3_server, key, secret)
    small = as_sets(TINY_RUN)
    where = ["--set", f"data.input={s3_bucket}/img", "--set", f"output={s3_bucket}/out"]
    result = runner.invoke(app, ["run", str(config), "-v", *where, *small])
    assert result.exit_code == 0, result.output
    written = _everything_written(f"{s3_bucket}/out", {"endpoint_url": s3_server})
    assert any(p.endswith("config.yaml") for p in written)
    places = {"printed output": result.output, **written, **_ray_logs()}
    for needle in (secret, key):
        leaks = [where for where, text in places.items() if needle in text]
        assert not leaks, f"{needle[:6]}… found in {leaks}"
