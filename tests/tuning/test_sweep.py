"""Sweeps on real Ray Tune over the real pretraining loop, on demo images.

The end-to-end test runs `maskdiet sweep` in a subprocess that joins the session's Ray by address (the
cluster path of the command), interrupts it with SIGINT once a trial has finished, resumes the sweep in
this process, and checks that finished trials ran once, that ASHA stopped a trial early, and that the
best config it writes runs `pretrain` as is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.config import ConfigError, load_config
from tuning.sweep import SWEEP_CONFIG, latest_sweep

STEPS = 20
EVAL_EVERY = 10


@pytest.fixture(scope="module")
def demo_manifest(ray_cluster: None, demo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One curated manifest of the demo folder (no scores: the random policy needs none)."""
    from pipeline.curate import curate

    out = tmp_path_factory.mktemp("sweep-curate")
    config = load_config(None, [f"data.input={demo_folder}", f"output={out}", "score.method=none"])
    return curate(config).manifest_url


def sweep_yaml(tmp_path: Path, manifest: str, **extra: object) -> Path:
    """A small sweep: a tiny MAE for a few steps; one learning rate far too small to learn, so ASHA has a
    trial that trails at a rung whatever the order; mask ratio and schedule as the axes users care about."""
    data = {
        "output": str(tmp_path / "out"),
        "pretrain": {
            "model": "mae_vit_micro_patch4",
            "steps": STEPS,
            "batch_size": 16,
            "eval_every": EVAL_EVERY,
            "checkpoint_every": EVAL_EVERY,
            "log_every": EVAL_EVERY,
            "val_images": 16,
            "warmup_steps": 2,
            "augment": False,
        },
        "tune": {
            "manifest": manifest,
            "num_samples": 1,
            # One at a time: ASHA's rungs live in the driver (not saved with the experiment), so the order
            # trials reach a rung must be the order they run in for a stop to be certain in a short sweep.
            "max_concurrent_trials": 1,
            "grace_period": 1,
            "reduction_factor": 2,
            "space": {
                "lr": {"grid": [2.0e-2, 1.0e-7]},
                "schedule": {"grid": ["constant", "linear"]},
                "mask_ratio": {"uniform": [0.5, 0.8]},
                "ratio_end": {"choice": [0.9]},
            },
        },
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_space_fails_before_any_trial(tmp_path: Path) -> None:
    """The CLI rejects a bad axis with one line naming it, before Ray starts or anything is written."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {"output": str(tmp_path / "out"), "tune": {"space": {"mask_ratio": {"uniform": [0.5, 1.2]}}}}
        )
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sweep", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "tune.space.mask_ratio" in done.stderr and "(0, 1)" in done.stderr
    assert not (tmp_path / "out").exists()  # no sweep folder, no curation, no trial
    assert time.perf_counter() - started < 60


def test_run_sweep_rejects_bad_space_and_score_free_manifest(
    ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    from tuning.sweep import run_sweep

    bad = load_config(
        sweep_yaml(tmp_path, demo_manifest), ["tune.space.schedule={grid: [constant, exponential]}"]
    )
    with pytest.raises(ConfigError, match=r"tune\.space\.schedule: bad value 'exponential'"):
        run_sweep(bad)
    # The demo manifest has no scores: sweeping a score-based policy is refused before the trials.
    scored_policy = load_config(
        sweep_yaml(tmp_path, demo_manifest), ["tune.space.policy={choice: [offset, random]}"]
    )
    with pytest.raises(ConfigError, match=r"no scores"):
        run_sweep(scored_policy)
    assert not list((tmp_path / "out" / "sweeps").glob("*/trials"))


def test_swept_steps_set_ashas_horizon_and_each_trials_status(tmp_path: Path) -> None:
    """With `steps` swept, ASHA may run a trial to the longest one's end, and a trial that ran all of its
    own steps is finished (not stopped), whatever the base config's steps."""
    from tuning.space import build_search_space
    from tuning.sweep import _scheduler, _status

    config = load_config(None, ["pretrain.steps=200", "tune.space={steps: {grid: [100, 300]}}"])
    space = build_search_space(config)
    asha = _scheduler(config, space, asha=lambda **kw: kw, fifo=dict)
    assert asha["max_t"] == 300
    assert _status("TERMINATED", None, steps=100, trial_steps=100, stopped=None) == "finished"
    assert _status("TERMINATED", None, steps=150, trial_steps=300, stopped=None) == "stopped"
    assert _status("TERMINATED", None, steps=40, trial_steps=300, stopped="non-finite loss") == "diverged"


def test_each_trial_splits_its_share_over_its_own_workers() -> None:
    """`tune.cpus_per_trial` / `gpus_per_trial` are per trial, whatever `num_workers` that trial has."""
    from pipeline.train import worker_resources
    from tuning.space import trial_config
    from tuning.sweep import split_trial_share, sweep_config

    config = load_config(
        None,
        ["tune.cpus_per_trial=2", "tune.gpus_per_trial=1", "pretrain.num_workers=1", "tune.eval_every=5"],
    )
    base = sweep_config(config).model_dump()
    for workers in (1, 4):
        params = {"pretrain.num_workers": workers, "pretrain.eval_every": 7}
        trial = split_trial_share(trial_config(base, params), params)
        resources = worker_resources(trial)
        assert resources["CPU"] * workers == pytest.approx(2.0)
        assert resources["GPU"] * workers == pytest.approx(1.0)
        assert trial.pretrain.eval_every == 7  # a swept key keeps the trial's value
    three = load_config(None, ["tune.gpus_per_trial=3", "pretrain.num_workers=2"])
    with pytest.raises(ConfigError, match=r"1\.5 GPUs each"):
        sweep_config(three)


def test_a_diverged_report_carries_every_metric_tune_may_watch() -> None:
    """Tune ends the whole sweep when a result lacks its metric: the stop report of a trial whose loss went
    non-finite holds each metric a sweep may rank by (as NaN), so only that trial ends."""
    import typing

    from pipeline.core.config import TuneConfig
    from pipeline.train_loop import diverged_metrics

    report = diverged_metrics(step=7, loss=float("inf"), message="non-finite loss (inf) at step 7")
    metrics = typing.get_args(TuneConfig.model_fields["metric"].annotation)
    assert set(metrics) <= set(report) and report["step"] == 7 and "stopped" in report
    assert all(np.isnan(report[m]) for m in metrics if m != "loss") and report["loss"] == float("inf")
    with pytest.raises(ConfigError, match=r"tune\.metric"):
        load_config(None, ["tune.metric=val_los"])


def test_trial_reprunes_the_one_manifest(ray_cluster: None, demo_manifest: str, tmp_path: Path) -> None:
    """The curation axis: each trial prunes the shared manifest with its own keep fraction, never rescoring."""
    from stages.manifest import read_manifest
    from tuning.sweep import trial_manifest

    shared = read_manifest(demo_manifest)
    for keep in (0.5, 0.8):
        config = load_config(None, ["prune.policy=random", f"prune.keep={keep}"])
        url = trial_manifest(config, demo_manifest, str(tmp_path / f"keep{keep}"), prunes=True)
        pruned = read_manifest(url)
        assert sorted(pruned["path"]) == sorted(shared["path"])  # same rows, same scores
        assert int(pruned["kept"].sum()) == round(keep * len(shared))
        assert set(pruned.loc[~pruned["kept"], "reason"]) == {"pruned:random"}
    assert trial_manifest(config, demo_manifest, str(tmp_path / "x"), prunes=False) == demo_manifest


def _started_trials(sweep_root: Path) -> list[Path]:
    return list(sweep_root.glob("*/trials/*/attempts"))


@pytest.mark.slow
@pytest.mark.timeout(
    1800
)  # a few minutes on an idle 2-core box; each trial's Train start-up is slow under load
def test_sweep_interrupt_resume_asha_and_best_config(
    ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    import ray

    from pipeline.train import pretrain
    from tuning.sweep import count_attempts, run_sweep

    mlruns = f"file://{tmp_path / 'mlruns'}"
    tracking = {"mlflow_uri": mlruns, "tensorboard_dir": str(tmp_path / "tb")}
    config_path = sweep_yaml(tmp_path, demo_manifest, tracking=tracking)
    sweeps = tmp_path / "out" / "sweeps"
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "sweep",
            str(config_path),
            "--name=s1",
            f"--set=ray.address={address}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 600
        # One trial at a time: once the second has started, Tune has recorded the first as done.
        while len(_started_trials(sweeps)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
        assert len(_started_trials(sweeps)) >= 2, "no trial finished in time"
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and the driver exits
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    sweep_dir = sweeps / "s1"
    interrupted = pd.read_parquet(sweep_dir / "results.parquet")
    done_before = set(interrupted.loc[interrupted["status"].isin(["finished", "stopped"]), "trial_id"])
    assert done_before, output[-3000:]
    if driver.returncode == 1:  # interrupted mid-sweep (it may, rarely, have finished before the signal)
        assert "--resume" in output and (interrupted["status"] == "unfinished").any()
        assert not (sweep_dir / "best.yaml").exists()

    resumed = run_sweep(load_config(config_path, ["tune.name=s1"]), resume=True)
    table = resumed.table
    assert len(table) == 4 and resumed.unfinished == 0
    assert set(table["status"]) <= {"finished", "stopped"}, table[["trial_id", "status", "error"]]
    for trial_id in done_before:  # finished trials were not rerun
        assert count_attempts(str(sweep_dir), trial_id) == 1
    # ASHA stopped at least one trial at a rung before the last step; finished ones reached it.
    assert (table["status"] == "stopped").sum() >= 1
    assert (table.loc[table["status"] == "stopped", "step"] < STEPS).all()
    assert (table.loc[table["status"] == "finished", "step"] == STEPS).all()
    objective = table["objective"].to_numpy(dtype=float)
    assert np.all(np.isfinite(objective)) and np.all(np.diff(objective) >= 0)  # sorted, best first
    # The learning rate that cannot learn never wins.
    assert table.iloc[0]["lr"] == pytest.approx(2.0e-2)

    # Files: table, plot, best config (loadable unchanged, one run's config: no space left).
    on_disk = pd.read_parquet(resumed.results_url)
    assert list(on_disk["trial_id"]) == list(table["trial_id"])
    assert Path(resumed.plot_url).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(resumed.best_config_url)
    assert best.tune.space == {}
    assert best.pretrain.base_lr == pytest.approx(2.0e-2)
    assert best.pretrain.mask.ratio == pytest.approx(table.iloc[0]["mask_ratio"])
    assert best.pretrain.mask.schedule == table.iloc[0]["schedule"]

    # Each trial is one tracked run (MLflow, TensorBoard), continued rather than repeated across the resume.
    from pipeline.tracking import mlflow_client, read_scalars

    client = mlflow_client(mlruns)
    runs = client.search_runs([client.get_experiment_by_name("maskdiet").experiment_id])
    by_trial = {run.data.tags["maskdiet.trial"]: run for run in runs}
    assert len(runs) == 4 and set(by_trial) == set(table["trial_id"])
    for row in table.itertuples():
        run = by_trial[row.trial_id]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(set(steps)) and steps[-1] == row.step  # no step twice, up to where it ended
        assert float(run.data.params["trial.pretrain.base_lr"]) == pytest.approx(row.lr)
        assert [s for s, _ in read_scalars(tmp_path / "tb" / "s1" / row.trial_id)["loss"]] == steps
    assert {run.info.status for run in runs} == {"FINISHED"}

    # The best config runs pretraining as is (a few steps here).
    short = best.model_copy(
        update={"pretrain": best.pretrain.model_copy(update={"steps": EVAL_EVERY, "cpus_per_worker": 0.5})}
    )
    result = pretrain(short, demo_manifest, str(tmp_path / "best-run"))
    assert result.steps == EVAL_EVERY and np.isfinite(result.final_loss)
    assert Path(result.encoder_url).exists()


def test_resume_names_the_settings_it_ignores(tmp_path: Path) -> None:
    """A resumed sweep runs on with its saved config: what the user changed since is listed, nothing else."""
    from pipeline.core.config import dump_config
    from tuning.sweep import ignored_on_resume

    started = load_config(None, ["pretrain.steps=40", "tune.manifest=/m/manifest.parquet", "tune.name=s1"])
    saved = tmp_path / "sweep.yaml"
    saved.write_text(dump_config(started))
    again = load_config(None, ["pretrain.steps=40", "tune.name=s1"])
    assert ignored_on_resume(again, load_config(saved)) == []  # defaults and the sweep's own keys: silent
    changed = load_config(
        None, ["pretrain.steps=80", "tune.num_samples=9", "data.input=/elsewhere", "ray.address=auto"]
    )  # data and ray come from now: not ignored
    assert ignored_on_resume(changed, load_config(saved)) == ["pretrain.steps=80", "tune.num_samples=9"]


def test_resume_picks_the_sweep_started_last_whatever_its_name(tmp_path: Path) -> None:
    """Job sweeps are named after their submission id, so names no longer sort by time."""
    for name, written in (
        ("sweep-20991231-235959", 1_000),
        ("maskdiet-job-7", 2_000),
        ("zz-no-config", 3_000),
    ):
        folder = tmp_path / name
        folder.mkdir()
        if name != "zz-no-config":
            (folder / SWEEP_CONFIG).write_text("tune: {}\n")
            os.utime(folder / SWEEP_CONFIG, (written, written))
    assert latest_sweep(str(tmp_path), {}) == "maskdiet-job-7"
    assert latest_sweep(str(tmp_path / "none-yet"), {}) is None
