"""Each run-producing command writes result.json where a job reader looks for it (`jobs.result_location`).

The flows are replaced by stand-ins returning their real result types, so these tests check only the
command's contract (which file, which run id, which outputs) in a second; the real curate job in
tests/pipeline/ops/test_jobs.py checks the whole trip through a Ray cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

import pipeline.core.runtime
import pipeline.core.storage
import pipeline.curate
import pipeline.run
import pipeline.train
import tuning.space
import tuning.sweep
from pipeline.cli import app
from pipeline.core.results import read_result
from pipeline.core.storage import join
from pipeline.ops import jobs


@contextlib.contextmanager
def _no_ray(*_: Any, **__: Any) -> Iterator[None]:
    yield


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.core.runtime, "ray_session", _no_ray)
    monkeypatch.setattr(pipeline.core.storage, "check_readable", lambda *a, **k: None)


def _curated(output: str, run_id: str) -> pipeline.curate.CurateResult:
    manifest = pd.DataFrame({"path": ["a.png"], "kept": [True], "reason": ["kept"], "score": [float("nan")]})
    return pipeline.curate.CurateResult(
        run_id=run_id,
        run_dir=join(output, "runs", run_id),
        manifest_url=join(output, "manifest.parquet"),
        quarantine_url=join(output, "quarantine.parquet"),
        manifest=manifest,
        quarantine=pd.DataFrame({"path": [], "reason": []}),
        seconds=1.0,
        counts={"kept": 1},
    )


def _invoke(*args: str) -> None:
    out = CliRunner().invoke(app, list(args))
    assert out.exit_code == 0, out.output


def _job_reads(command: str, sid: str) -> dict[str, str]:
    """The outputs `jobs status` finds for a job that ran `command` (run id = submission id)."""
    sub = jobs.prepare_submission(command, submission_id=sid)
    state = jobs.job_outputs(
        jobs.JobState(sid, "SUCCEEDED", entrypoint=sub.entrypoint, metadata=sub.metadata)
    )
    assert state.outputs_note == ""
    return state.outputs


def test_curate_writes_result_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")
    monkeypatch.setattr(pipeline.curate, "curate", lambda cfg, progress=None: _curated(out, cfg.run_id))
    _invoke("curate", "-i", str(tmp_path), "-o", out, "--score", "none", "--set", "run_id=job-1")
    result = read_result(out)
    assert result is not None and (result["command"], result["run_id"]) == ("curate", "job-1")
    assert result["outputs"] == {
        "manifest": f"{out}/manifest.parquet",
        "quarantine": f"{out}/quarantine.parquet",
        "run_dir": f"{out}/runs/job-1",
    }
    assert _job_reads(f"maskdiet curate -i {tmp_path} -o {out}", "job-1") == result["outputs"]


def test_pretrain_writes_result_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")

    def fake(cfg: Any, manifest: str, output: str, *, run_name: str, progress: Any = None, **_: Any) -> Any:
        return pipeline.train.PretrainResult(
            run_name=run_name,
            steps=2,
            first_loss=float("nan"),  # a run that logged no loss: written as null
            final_loss=1.0,
            val_loss=None,
            images_per_s=10.0,
            seconds=1.0,
            encoder_url=join(output, "encoder.pth"),
            metrics_url=join(output, "metrics.jsonl"),
            checkpoint=None,
        )

    monkeypatch.setattr(pipeline.train, "pretrain", fake)
    _invoke("pretrain", "-m", "m.parquet", "-o", out, "--run-name", "job-2")
    result = read_result(out)
    assert result is not None and result["run_id"] == "job-2"
    assert result["outputs"] == {"encoder": f"{out}/encoder.pth", "metrics": f"{out}/metrics.jsonl"}
    assert _job_reads(f"maskdiet pretrain -m m.parquet -o {out}", "job-2") == result["outputs"]


def test_run_writes_result_json_into_its_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")

    def fake(cfg: Any, previous: Any = None, progress: Any = None) -> pipeline.run.RunResult:
        run_dir = join(cfg.output, "runs", cfg.run_id)
        summary = {"run_id": cfg.run_id, "run_dir": run_dir, "kept": 1, "pruned": 0, "seconds": 1.0}
        return pipeline.run.RunResult(run_dir=run_dir, curate=_curated(run_dir, cfg.run_id), summary=summary)

    monkeypatch.setattr(pipeline.run, "run_pipeline", fake)
    _invoke("run", "--set", f"data.input={tmp_path}", "--set", f"output={out}", "--set", "run_id=job-3")
    run_dir = f"{out}/runs/job-3"
    result = read_result(run_dir)
    assert result is not None and result["run_id"] == "job-3" and result["summary"]["kept"] == 1
    assert result["outputs"]["run_dir"] == run_dir
    assert result["outputs"]["manifest"] == f"{run_dir}/manifest.parquet"
    assert _job_reads(f"maskdiet run --set output={out}", "job-3") == result["outputs"]


def test_sweep_writes_result_json_into_its_sweep_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")

    def fake(cfg: Any, **_: Any) -> tuning.sweep.SweepResult:
        sweep_dir = join(out, "sweeps", cfg.tune.name)
        table = pd.DataFrame(
            {"trial_id": ["t1"], "objective": [0.5], "stopped_early": [False], "status": ["done"]}
        )
        return tuning.sweep.SweepResult(
            sweep_dir=sweep_dir,
            table=table,
            best_config=None,
            results_url=join(sweep_dir, "results.parquet"),
            best_config_url=None,
            plot_url=None,
            metric="val_loss",
            mode="min",
            seconds=1.0,
        )

    monkeypatch.setattr(tuning.space, "build_search_space", lambda cfg: None)
    monkeypatch.setattr(tuning.sweep, "run_sweep", fake)
    _invoke("sweep", "--set", f"output={out}", "--name", "job-4")
    result = read_result(f"{out}/sweeps/job-4")
    assert result is not None and result["run_id"] == "job-4"
    assert result["outputs"] == {
        "sweep_dir": f"{out}/sweeps/job-4",
        "results": f"{out}/sweeps/job-4/results.parquet",
    }
    assert _job_reads(f"maskdiet sweep --set output={out}", "job-4") == result["outputs"]
