"""`maskdiet run` end to end: the demo from a clean folder, and an incremental rerun on S3.

Small `--set` values keep each run short; every stage still runs for real (Ray Data, Ray Train, evaluation,
report)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import s3fs
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from tests.tiny import TINY_RUN, as_sets

# the demo's own pretraining, with its proxy CNNs cut short (2 models for 2 epochs). Its 330 pretraining
# steps stay: the kNN margin over random init needs them (2026-12-05, 2 cores: 330 steps gave kNN 0.223,
# 200 steps 0.175, against 0.15 at random init and the +0.03 this test asks for).
FAST_CURATE = ["--set", "score.num_models=2", "--set", "score.epochs=2"]
FAST = as_sets(TINY_RUN)

runner = CliRunner()


def run_dir_of(output: str) -> str:
    return output.rstrip("/") + "/runs/"


@pytest.mark.slow
def test_demo_from_a_clean_folder(ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded demo with its own pretraining (only the proxy models are cut short): besides every artifact,
    the pretrained encoder must beat its random initialisation on kNN and on the linear probe."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", *FAST_CURATE])
    assert result.exit_code == 0, result.output
    assert "injected noisy labels pruned" in result.output and "report:" in result.output
    runs = tmp_path / "maskdiet-demo" / "output" / "runs"
    run_dir = Path((runs / "latest").read_text())
    for name in ("config.yaml", "manifest.parquet", "quarantine.parquet", "encoder.pth", "metrics.jsonl",
                 "evaluation.json", "summary.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "checkpoints").rglob("state.pt")) or any((run_dir / "checkpoints").iterdir())
    for name in ("scores.png", "examples.png", "training.png", "evaluation.png"):
        with Image.open(run_dir / "report" / name) as image:
            assert image.format == "PNG"
    assert (run_dir / "report" / "index.html").read_text().startswith("<!doctype html>")
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = pd.read_parquet(run_dir / "manifest.parquet")
    quarantine = pd.read_parquet(run_dir / "quarantine.parquet")
    assert summary["kept"] == int(manifest["kept"].sum()) and summary["pruned"] == int(
        (~manifest["kept"]).sum()
    )
    assert summary["quarantined"] == len(quarantine) == 10
    assert summary["images_read"] == len(manifest) + len(quarantine) == 2010
    assert 0 < summary["noisy_pruned"] <= summary["noisy_total"]
    assert summary["steps"] == 330 and summary["final_loss"] < 0.6 * summary["first_loss"]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["knn_accuracy"] > evaluation["random_knn_accuracy"] + 0.03, evaluation
    assert evaluation["probe_accuracy"] > evaluation["random_probe_accuracy"] + 0.03, evaluation
    # the baselines beside it: raw pixels (kNN, probe) and a short fine-tune, on the true labels
    baselines = [
        "pixel_knn_accuracy",
        "pixel_probe_accuracy",
        "finetune_accuracy",
        "random_finetune_accuracy",
    ]
    assert list(evaluation)[4:8] == baselines, evaluation
    assert all(0.0 <= evaluation[key] <= 1.0 and summary[key] == evaluation[key] for key in baselines)
    assert evaluation["finetune_accuracy"] > evaluation["random_finetune_accuracy"], evaluation
    assert evaluation["labels"] == "demo truth", evaluation  # never the noisy folder labels
    assert "raw pixels" in result.output
    assert "raw pixels" in (run_dir / "report" / "index.html").read_text()


def add_images(fs: s3fs.S3FileSystem, folder: str, count: int) -> None:
    rng = np.random.default_rng(7)
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        fs.pipe_file(f"{folder}/new_{i:03d}.png", buffer.getvalue())


@pytest.mark.slow
def test_incremental_run_on_s3(ray_cluster: None, s3_bucket: str) -> None:
    images, output = f"{s3_bucket}/images", f"{s3_bucket}/out"
    assert runner.invoke(app, ["demo-data", images, "--per-class", "8", "--bad", "2"]).exit_code == 0
    args = ["run", "--set", f"data.input={images}", "--set", f"output={output}", *FAST]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    first_dir = fs.cat_file(f"{output}/runs/latest".removeprefix("s3://")).decode()
    first_summary = json.loads(fs.cat_file(f"{first_dir}/summary.json".removeprefix("s3://")))
    assert first_summary["scored"] == 80 and first_summary["cached"] == 0

    add_images(fs, f"{images}/digit_3".removeprefix("s3://"), 20)
    second = runner.invoke(app, [*args, "--previous", "latest"])
    assert second.exit_code == 0, second.output
    second_dir = fs.cat_file(f"{output}/runs/latest".removeprefix("s3://")).decode()
    assert second_dir != first_dir
    summary = json.loads(fs.cat_file(f"{second_dir}/summary.json".removeprefix("s3://")))
    assert summary["scored"] == 20 and summary["cached"] == 80 and summary["new_images"] == 20
    with fs.open(f"{second_dir}/manifest.parquet".removeprefix("s3://"), "rb") as f:
        assert len(pd.read_parquet(f)) == 100
    assert fs.exists(f"{second_dir}/report/index.html".removeprefix("s3://"))


def test_previous_run_lends_its_score_cache_across_outputs(tmp_path: Path) -> None:
    """`--previous DIR` reuses that run's scores even when this run writes to another output: the cache is
    the one its saved config names; an explicit score.cache_url still wins."""
    from pipeline.core.config import dump_config, load_config
    from pipeline.run import score_cache_url

    old_run = tmp_path / "old" / "runs" / "r1"
    old_run.mkdir(parents=True)
    old = load_config(
        None, [f"output={tmp_path / 'old'}", f"score.cache_url={tmp_path / 'old' / 'score_cache'}"]
    )
    (old_run / "config.yaml").write_text(dump_config(old))
    new = load_config(None, [f"output={tmp_path / 'new'}"])
    assert score_cache_url(new, str(old_run)) == str(tmp_path / "old" / "score_cache")
    assert score_cache_url(new, None) == f"{tmp_path / 'new'}/score_cache"
    pinned = load_config(None, [f"output={tmp_path / 'new'}", "score.cache_url=s3://b/cache"])
    assert score_cache_url(pinned, str(old_run)) == "s3://b/cache"
    # The default output is relative: its cache is found beside that run's runs/ folder, not in this cwd.
    relative = load_config(None, ["output=maskdiet-output", "score.cache_url=maskdiet-output/score_cache"])
    (old_run / "config.yaml").write_text(dump_config(relative))
    assert score_cache_url(new, str(old_run)) == f"{tmp_path / 'old'}/score_cache"


def test_previous_run_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--previous out/runs/r1` is resolved here: Train workers load its encoder from other folders."""
    from pipeline.run import resolve_previous

    monkeypatch.chdir(tmp_path)
    assert resolve_previous("out", "out/runs/r1/") == str(tmp_path / "out" / "runs" / "r1")
    assert resolve_previous("out", "s3://b/out/runs/r1/") == "s3://b/out/runs/r1"


@pytest.mark.slow
def test_run_over_webdataset_shards_then_its_parquet_export(
    ray_cluster: None, demo_folder: Path, tmp_path: Path
) -> None:
    """`maskdiet run` end to end on shards: curate, pretrain streaming `shard.tar#key` paths through Ray Data
    (no decoded cache), and evaluate on the curated samples (there is no folder to list). The run is tracked
    in an MLflow file store and TensorBoard event files, read back here. Its kept images, exported as Parquet
    tables, then go through `maskdiet run` too."""
    from tests.stages.test_formats import folder_items, write_shards

    items, _ = folder_items(demo_folder)
    write_shards(items, str(tmp_path / "shards"), per_shard=64)
    output = tmp_path / "out"
    args = ["run", "--set", f"data.input={tmp_path / 'shards'}", "--set", f"output={output}", *FAST]
    args += ["--set", "pretrain.cache_decoded_mib=0"]  # stream the shards every epoch
    args += ["--set", "export.format=parquet", "--set", "export.samples_per_shard=40"]
    mlruns, tensorboard = f"file://{tmp_path / 'mlruns'}", tmp_path / "tb"
    args += ["--set", f"tracking.mlflow_uri={mlruns}", "--set", f"tracking.tensorboard_dir={tensorboard}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = Path((output / "runs" / "latest").read_text())
    manifest = pd.read_parquet(run_dir / "manifest.parquet")
    assert manifest["path"].str.contains(r"\.tar#").all()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == TINY_RUN["pretrain.steps"]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["num_train"] + evaluation["num_test"] == len(manifest)

    from pipeline.tracking import KEY_TAG, mlflow_client, read_scalars

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    client = mlflow_client(mlruns)
    experiment = client.get_experiment_by_name("maskdiet").experiment_id
    (tracked,) = client.search_runs([experiment], filter_string=f"tags.`{KEY_TAG}` = '{run_dir}'")
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == run_dir.name
    assert tracked.data.params["data.input"] == str(tmp_path / "shards")
    history = client.get_metric_history(tracked.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(line["step"], line["loss"]) for line in metrics]
    assert tracked.data.metrics["summary/kept"] == int(manifest["kept"].sum())
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"config.yaml", "summary.json", "evaluation.json", "metrics.jsonl", "report"} <= artifacts
    scalars = read_scalars(tensorboard / run_dir.name)
    assert [step for step, _ in scalars["loss"]] == [line["step"] for line in metrics]

    # The run exported its kept images as Parquet tables (export.format); `maskdiet run` over those tables
    # is the Parquet path end to end: the same images by sha256, pretrained, evaluated and reported.
    exported = run_dir / "export"
    assert json.loads((exported / "_export.json").read_text())["samples"] == int(manifest["kept"].sum())
    args = ["run", "--set", f"data.input={exported}", "--set", f"output={tmp_path / 'out2'}", *FAST]
    args += ["--set", "score.method=none", "--set", "prune.policy=none"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    second = Path((tmp_path / "out2" / "runs" / "latest").read_text())
    tables = pd.read_parquet(second / "manifest.parquet")
    assert tables["path"].str.contains(r"\.parquet#").all()
    assert set(tables["sha256"]) == set(manifest.loc[manifest["kept"], "sha256"])
    assert json.loads((second / "summary.json").read_text())["steps"] == TINY_RUN["pretrain.steps"]
    assert (second / "evaluation.json").exists() and (second / "report" / "index.html").exists()
