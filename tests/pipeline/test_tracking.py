"""Runs logged to a real MLflow file store (read back with MLflow's client) and to TensorBoard event files
(parsed back); resuming the same run continues it without logging a step twice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.core.config import TrackingConfig, load_config
from pipeline.core.errors import UserInputError
from pipeline.tracking import KEY_TAG, mlflow_client, open_tracker, read_scalars, tracked

LINES = [
    {"step": 10, "loss": 0.9, "val_loss": 0.95, "lr": 1e-3, "time": 1.0},
    {"step": 20, "loss": 0.7, "val_loss": float("nan"), "lr": 9e-4, "time": 2.0},
]


def _mlflow_run(uri: str, key: str):  # the one MLflow run tracked under `key`
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("maskdiet")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'")
    assert len(runs) == 1
    return client, runs[0]


def test_a_run_reaches_mlflow_and_tensorboard_and_resumes_without_repeats(tmp_path: Path) -> None:
    uri = f"file://{tmp_path / 'mlruns'}"
    tracking = TrackingConfig(mlflow_uri=uri, tensorboard_dir=str(tmp_path / "tb"))
    config = load_config(
        overrides=["pretrain.steps=40", "data.storage_options={key: AKIA-SECRET, secret: s3cr3t}"]
    )
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "report").mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"steps": 20}')
    (run_dir / "report" / "summary.md").write_text("# r1")

    with tracked(tracking, "r1", key=str(run_dir)) as tracker:
        tracker.log_config(config)
        tracker.log_metrics(LINES[:1])
        tracker.log_metrics(LINES)  # the watcher passes every line so far: step 10 is not logged twice
        tracker.log_summary({"kept": 70, "linear_probe_accuracy": 0.5, "run_dir": str(run_dir)})
        tracker.log_files(str(run_dir))

    client, run = _mlflow_run(uri, str(run_dir))
    assert run.info.status == "FINISHED"
    assert run.data.params["pretrain.steps"] == "40"
    assert "s3cr3t" not in str(run.data.params) and "AKIA-SECRET" not in str(run.data.params)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (10, 0.9),
        (20, 0.7),
    ]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [10]  # NaN left out
    assert run.data.metrics["summary/linear_probe_accuracy"] == 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "report", "config_yaml.txt"} <= artifacts
    scalars = read_scalars(tmp_path / "tb" / "r1")
    assert [step for step, _ in scalars["loss"]] == [10, 20]
    assert scalars["summary/kept"] == [(20, 70.0)]

    # The same run again (a resumed run): the same MLflow run and folder, only the new step logged.
    with tracked(tracking, "r1", key=str(run_dir)) as tracker:
        tracker.log_metrics([*LINES, {"step": 30, "loss": 0.5}])
    client, run = _mlflow_run(uri, str(run_dir))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [10, 20, 30]
    assert [step for step, _ in read_scalars(tmp_path / "tb" / "r1")["loss"]] == [10, 20, 30]


def test_a_failing_block_marks_the_mlflow_run_failed(tmp_path: Path) -> None:
    uri = f"file://{tmp_path / 'mlruns'}"
    with pytest.raises(RuntimeError), tracked(TrackingConfig(mlflow_uri=uri), "r2", key="k2"):
        raise RuntimeError("the run died")
    _, run = _mlflow_run(uri, "k2")
    assert run.info.status == "FAILED"


def test_nothing_configured_logs_nothing(tmp_path: Path) -> None:
    tracker = open_tracker(TrackingConfig(), "r", key="k")
    assert not tracker.enabled
    tracker.log_metrics(LINES)
    tracker.log_files(str(tmp_path))
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_on_s3_is_uploaded_when_the_run_closes(s3_bucket: str) -> None:
    root = f"{s3_bucket}/tb"
    with tracked(TrackingConfig(tensorboard_dir=root), "r3", key="k3") as t:
        t.log_metrics(LINES)
    with tracked(TrackingConfig(tensorboard_dir=root), "r3", key="k3") as t:
        assert t.sinks[0].last_step == 20  # the uploaded events were read back
        t.log_metrics([{"step": 30, "loss": 0.5}])
    from pipeline.core.storage import url_to_fs

    fs, path = url_to_fs(root)
    assert len([p for p in fs.ls(f"{path}/r3") if "tfevents" in p]) == 2


def test_mlflow_missing_is_a_user_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if not installed: its import fails
    with pytest.raises(UserInputError, match=r"maskdiet\[mlflow\]"):
        mlflow_client("file:///tmp/mlruns")
