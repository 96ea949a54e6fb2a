"""`maskdiet jobs` against a real Ray head (`ray start --head`, dashboard on, token auth as Ray 2.60 sets it).

A curate job on demo images runs to SUCCEEDED and leaves its manifest where `jobs status` says; a long job is
stopped; a reused submission id is refused; a missing or wrong token fails with a message that says what to
set and never shows the token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.results import write_result
from pipeline.ops import jobs


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------- offline


def test_find_token_follows_rays_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    token_file = tmp_path / "tok"
    token_file.write_text("from-path")
    assert jobs.find_token({}, home) == "from-home"
    assert jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == "from-path"
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert jobs.find_token(env, home) == "from-env"
    assert jobs.find_token({**env, "RAY_AUTH_MODE": "disabled"}, home) is None
    assert jobs.find_token({}, tmp_path / "nobody") is None


def test_config_travels_in_the_working_dir(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("output: s3://bucket/out\n")
    sub = jobs.prepare_submission(
        "maskdiet run --previous latest", config=str(config), submission_id="nightly-1", pip=["duckdb"]
    )
    try:
        shipped = Path(sub.runtime_env["working_dir"]) / jobs.CONFIG_NAME
        assert shipped.read_text() == config.read_text()
        assert sub.entrypoint == (
            f"maskdiet run --previous latest --config {jobs.CONFIG_NAME} --set run_id=nightly-1"
        )
        assert sub.runtime_env["pip"] == ["duckdb"]
        assert sub.metadata["output"] == "s3://bucket/out"
        state = jobs.JobState("nightly-1", "RUNNING", metadata=sub.metadata)
        assert state.run_dir == "s3://bucket/out/runs/nightly-1"  # known before the job prints anything
    finally:
        import shutil

        shutil.rmtree(sub.staged_dir or "", ignore_errors=True)
    by_url = jobs.prepare_submission("maskdiet curate", config="s3://b/c.yaml", submission_id="x")
    assert "working_dir" not in by_url.runtime_env
    assert by_url.entrypoint == "maskdiet curate --config s3://b/c.yaml --set run_id=x"
    with pytest.raises(ValueError, match="not both"):
        jobs.prepare_submission("maskdiet curate --config a.yaml", config=str(config))
    for command in ("maskdiet run large.yaml", "maskdiet run --previous latest -v large.yaml"):
        with pytest.raises(ValueError, match="not both"):  # run's CONFIG argument names a config too
            jobs.prepare_submission(command, config=str(config))
    with pytest.raises(ValueError, match="bad submission id"):
        jobs.prepare_submission("maskdiet curate", submission_id="no spaces please")


def _job(command: str, sid: str, status: str = "SUCCEEDED", config: str | None = None) -> jobs.JobState:
    """The job a submission of `command` becomes, as `job_status` reads it back from the cluster."""
    sub = jobs.prepare_submission(command, config=config, submission_id=sid)
    if sub.staged_dir:
        import shutil

        shutil.rmtree(sub.staged_dir, ignore_errors=True)
    return jobs.JobState(sid, status, entrypoint=sub.entrypoint, metadata=sub.metadata)


def test_a_job_finds_its_outputs_in_result_json(tmp_path: Path) -> None:
    """Outputs come from the result.json the job's run writes where the submission says, checked to be this
    job's run; whatever the job printed is not read."""
    out = tmp_path / "curated"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"output": str(out)}))  # shipped with the job: read only here
    running = jobs.job_outputs(_job("maskdiet curate -i s3://b/in", "cur-1", "RUNNING", str(config)))
    assert running.outputs == {} and "not written yet" in running.outputs_note
    assert running.result_url == str(out / "result.json")

    write_result(str(out), {"command": "curate", "run_id": "cur-1", "outputs": {"manifest": "m.parquet"}})
    done = jobs.job_outputs(_job("maskdiet curate -i s3://b/in", "cur-1", config=str(config)))
    assert done.outputs == {"manifest": "m.parquet"} and done.outputs_note == ""

    # A later curate into the same output replaced the file: this job's outputs are no longer known.
    other = jobs.job_outputs(_job(f"maskdiet curate -i s3://b/in -o {out}", "cur-0"))
    assert other.outputs == {} and "from run cur-1, not this job's run cur-0" in other.outputs_note
    failed = jobs.job_outputs(_job(f"maskdiet curate -i x -o {tmp_path / 'none'}", "cur-2", "FAILED"))
    assert "ended FAILED before writing it" in failed.outputs_note
    (out / "result.json").write_text("manifest: m.parquet\n")  # not ours: said, not a crash
    broken = jobs.job_outputs(_job(f"maskdiet curate -i x -o {out}", "cur-1"))
    assert broken.outputs == {} and "is not JSON" in broken.outputs_note


def test_each_run_command_has_its_result_folder(tmp_path: Path) -> None:
    def where(command: str, sid: str = "job-7", config: str | None = None) -> str | None:
        location = jobs.result_location(_job(command, sid, config=config))
        assert location is not None
        return location.dir_url or location.unknown

    out = str(tmp_path / "out")
    assert where(f"maskdiet run --set output={out}") == f"{out}/runs/job-7"
    assert where(f"maskdiet run --set output={out} --set run_id=mine") == f"{out}/runs/mine"
    assert where(f"maskdiet pretrain -m m.parquet -o {out}") == out
    assert where(f"maskdiet sweep --set output={out}") == f"{out}/sweeps/job-7"
    assert where("maskdiet sweep --set tune.output=s3://b/sw --name n1") == "s3://b/sw/n1"
    # A config at a URL is not read at submission; it is read when the outputs are asked for.
    url_config = tmp_path / "url.yaml"
    url_config.write_text(yaml.safe_dump({"output": "s3://bucket/nightly"}))
    assert where("maskdiet run --previous latest", config=f"file://{url_config}") == (
        "s3://bucket/nightly/runs/job-7"
    )
    # What cannot be known from here is said, not guessed.
    assert "relative to the job's working directory" in where("maskdiet curate -i x -o rel/out")
    assert "not known here" in where("maskdiet curate -i x")  # no output given: the default is relative
    assert "run id is not known" in where(f"maskdiet sweep --resume --set output={out}")
    assert jobs.result_location(_job("maskdiet evaluate --checkpoint c --data d", "e")) is None
    assert jobs.result_location(_job("sleep 600", "s")) is None
    plain = jobs.job_outputs(_job("sleep 600", "s"))
    assert plain.outputs == {} and plain.outputs_note == ""


def test_address_resolution() -> None:
    assert jobs.resolve_address(None, {}) == jobs.DEFAULT_ADDRESS
    assert jobs.resolve_address("head:8265", {}) == "http://head:8265"
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == jobs.DEFAULT_ADDRESS
    with pytest.raises(jobs.JobsError, match="8265"):
        jobs.resolve_address("ray://head:10001", {})


# ---------------------------------------------------------------------------------------------- real head


@pytest.mark.slow
def test_curate_job_runs_to_success_and_finds_its_manifest(
    ray_head: str, demo_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "curated"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"output": str(out), "data": {"read_batch_size": 32}}))
    sid = f"curate-{os.getpid()}-{int(time.time())}"
    code, stdout, stderr = _cli(
        "jobs", "submit", "--address", ray_head, "--config", str(config), "--submission-id", sid,
        "--follow", "--", "maskdiet", "curate", "--input", str(demo_folder), "--score", "none",
    )  # fmt: skip
    assert code == 0, stdout + stderr
    assert stdout.splitlines()[0] == sid
    assert "manifest:" in stdout  # the job's own output, streamed by --follow

    code, stdout, _ = _cli("jobs", "status", sid, "--address", ray_head)
    assert code == 0 and stdout.strip().splitlines()[-1] == "SUCCEEDED"
    state = jobs.job_status(jobs.connect(ray_head), sid)
    assert state.result_url == str(out / "result.json")  # found from the submission, not from the logs
    manifest_url = state.outputs["manifest"]
    assert manifest_url == str(out / "manifest.parquet")
    assert state.outputs["quarantine"] == str(out / "quarantine.parquet")
    manifest = pd.read_parquet(manifest_url)
    truth = pd.read_parquet(demo_folder / "_truth.parquet")
    assert len(manifest) == len(truth) and manifest["kept"].all()
    run_id = pq.read_schema(manifest_url).metadata[b"maskdiet.run_id"].decode()
    assert run_id == sid  # jobs give run-producing commands run_id = submission id

    code, logs, _ = _cli("jobs", "logs", sid, "--address", ray_head)
    assert code == 0 and f"manifest: {manifest_url}" in logs

    # The same id again is refused by the cluster: a retried submission cannot run twice.
    with pytest.raises(jobs.JobsError, match="already exists"):
        jobs.submit(jobs.connect(ray_head), "maskdiet curate", submission_id=sid)


def test_long_job_is_stopped(ray_head: str) -> None:
    sid = f"sleep-{os.getpid()}-{int(time.time())}"
    code, stdout, stderr = _cli(
        "jobs", "submit", "--address", ray_head, "--submission-id", sid, "--", "sleep", "600"
    )
    assert code == 0, stdout + stderr
    client = jobs.connect(ray_head)
    deadline = time.monotonic() + 60
    while jobs.job_status(client, sid, with_outputs=False).status != "RUNNING":
        assert time.monotonic() < deadline, "the sleep job never started"
        time.sleep(0.5)
    code, stdout, _ = _cli("jobs", "stop", sid, "--address", ray_head)
    assert code == 0 and stdout.strip() == "STOPPED"
    code, stdout, _ = _cli("jobs", "list", "--address", ray_head)
    assert code == 0 and f"{sid} STOPPED" in stdout.splitlines()


def test_wrong_token_is_rejected_without_showing_it(ray_head: str) -> None:
    secret = "not-the-token-0123456789"
    with pytest.raises(jobs.JobsError) as err:
        jobs.list_jobs(jobs.connect(ray_head, env={"RAY_AUTH_TOKEN": secret}))
    assert "RAY_AUTH_TOKEN" in str(err.value) and secret not in str(err.value)


def test_missing_token_says_what_to_set(ray_head: str, tmp_path: Path) -> None:
    """A user with no token anywhere (fresh HOME, no RAY_AUTH_* variables) is told exactly what to set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "jobs", "list", "--address", ray_head],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "requires a token" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr


def test_jobs_name_their_runs_after_the_submission_id(tmp_path: Path) -> None:
    def entrypoint(command: str) -> str:
        return jobs.prepare_submission(command, submission_id="job-7").entrypoint

    # Without a name of its own, each pretrain job had checkpoints/pretrain: a second job resumed the first.
    assert entrypoint("maskdiet pretrain -m s3://b/m.parquet") == (
        "maskdiet pretrain -m s3://b/m.parquet --run-name job-7"
    )
    assert entrypoint("maskdiet pretrain -m m.parquet --run-name mine").endswith("--run-name mine")
    plain, named = tmp_path / "plain.yaml", tmp_path / "named.yaml"
    plain.write_text("tune: {num_samples: 2}\n")
    named.write_text("tune: {name: mine}\n")
    assert entrypoint(f"maskdiet sweep {plain}") == f"maskdiet sweep {plain} --name job-7"
    for kept in (
        f"maskdiet sweep {plain} --name mine",
        f"maskdiet sweep {plain} --set tune.name=mine",
        f"maskdiet sweep {plain} --set=tune.name=mine",
        f"maskdiet sweep {named}",  # --name would win over the file's tune.name
        "maskdiet sweep not-here.yaml",  # unreadable here: the file may name it
        f"maskdiet sweep {plain} --resume",  # continues the latest sweep
    ):
        assert "job-7" not in entrypoint(kept), kept
    by_config = jobs.prepare_submission("maskdiet sweep", config=str(named), submission_id="job-7")
    assert "job-7" not in by_config.entrypoint
    assert entrypoint("maskdiet curate -i data/") == "maskdiet curate -i data/ --set run_id=job-7"
    for own in (
        "maskdiet run --set run_id=mine",
        "maskdiet run --set=run_id=mine",
        "maskdiet run -s run_id=mine",
    ):
        submission = jobs.prepare_submission(own, submission_id="job-7")
        assert submission.entrypoint == own and submission.metadata["run_id"] == "mine"
    assert (
        entrypoint("maskdiet evaluate --checkpoint c --data d") == "maskdiet evaluate --checkpoint c --data d"
    )


def test_a_job_knows_its_submission_id() -> None:
    """`maskdiet pretrain` inside a Ray job (an exported RayJob or RayCronJob slot, which `jobs submit` does
    not name) defaults its run name to the job's submission id: every slot shared checkpoints/pretrain."""
    config = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "maskdiet-nightly-x"}})
    assert jobs.current_submission_id({jobs.JOB_CONFIG_ENV: config}) == "maskdiet-nightly-x"
    assert jobs.current_submission_id({}) is None
    assert jobs.current_submission_id({jobs.JOB_CONFIG_ENV: "not json"}) is None
    assert jobs.current_submission_id({jobs.JOB_CONFIG_ENV: json.dumps({"metadata": {}})}) is None


def test_a_real_job_sees_its_submission_id(ray_head: str) -> None:
    sid = f"whoami-{os.getpid()}-{int(time.time())}"
    probe = "from pipeline.ops.jobs import current_submission_id as c; print('submission id:', c())"
    code, stdout, stderr = _cli(
        "jobs", "submit", "--address", ray_head, "--submission-id", sid, "--follow", "--",
        sys.executable, "-c", probe,
    )  # fmt: skip
    assert code == 0, stdout + stderr
    assert f"submission id: {sid}" in stdout
