"""Schedules with a controllable clock: idempotent slots, concurrency, catch-up, retries, history.

The cluster is a small in-memory stand-in (`FakeCluster`) for the policy tests, which need jobs that stay
RUNNING on command; one test runs `run-due` against the real Ray head and a real job.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.ops import jobs
from pipeline.ops.schedule_export import export_manifest
from pipeline.ops.schedule_policy import (
    RayJobsSubmitter,
    add_schedule,
    history,
    run_due,
    serve,
    submission_id_for,
)
from pipeline.ops.schedule_state import Schedule, ScheduleError, load_state

T0 = dt.datetime(2026, 1, 1, 0, 0, tzinfo=dt.UTC)


def at(day: int, hour: int = 3, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 1, day, hour, minute, tzinfo=dt.UTC)


class FakeCluster:
    """Jobs keyed by submission id; new jobs are RUNNING until `finish` (or at once with `instant`)."""

    def __init__(self, instant: bool = False) -> None:
        self.jobs: dict[str, str] = {}
        self.submits: list[str] = []
        self.instant = instant
        self.fail_next = 0

    def submit(self, schedule: Schedule, submission_id: str) -> bool:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("cluster unreachable")
        if submission_id in self.jobs:
            return False
        self.submits.append(submission_id)
        self.jobs[submission_id] = "SUCCEEDED" if self.instant else "RUNNING"
        return True

    def status(self, schedule: Schedule, submission_id: str) -> str | None:
        return self.jobs.get(submission_id)

    def stop(self, schedule: Schedule, submission_id: str) -> None:
        self.jobs[submission_id] = "STOPPED"

    def finish(self, submission_id: str, status: str = "SUCCEEDED") -> None:
        self.jobs[submission_id] = status


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "nightly.yaml"
    path.write_text("output: s3://bucket/maskdiet\n")
    return path


def _add(state: str, config: Path, **kw: object) -> Schedule:
    return add_schedule(state, "nightly", "0 3 * * *", str(config), now=T0, **kw)  # type: ignore[arg-type]


def test_doubled_run_due_submits_once(tmp_path: Path, config_file: Path) -> None:
    state = str(tmp_path / "state.json")
    _add(state, config_file)
    cluster = FakeCluster()
    assert run_due(state, now=at(1, 2, 59), submitter=cluster) == []  # not due yet
    snapshot = Path(state).read_bytes()
    first = run_due(state, now=at(1, 3, 0), submitter=cluster)
    sid = submission_id_for("nightly", at(1))
    assert [(r.submission_id, r.outcome) for r in first] == [(sid, "submitted")]
    assert sid == "maskdiet-nightly-20260101T0300Z"
    assert run_due(state, now=at(1, 3, 1), submitter=cluster) == []  # the retry finds the slot handled
    # A second scheduler that read the state before the first one wrote it: the cluster already has the id.
    Path(state).write_bytes(snapshot)
    racing = run_due(state, now=at(1, 3, 2), submitter=cluster)
    assert [(r.submission_id, r.outcome) for r in racing] == [(sid, "submitted")]
    assert "already on the cluster" in racing[0].message
    assert cluster.submits == [sid]


def test_running_previous_makes_the_next_slot_skipped(tmp_path: Path, config_file: Path) -> None:
    state = str(tmp_path / "state.json")
    _add(state, config_file)
    cluster = FakeCluster()
    run_due(state, now=at(1, 3, 5), submitter=cluster)
    day2 = run_due(state, now=at(2, 3, 5), submitter=cluster)
    assert [r.outcome for r in day2] == ["skipped"]
    assert submission_id_for("nightly", at(1)) in day2[0].message
    cluster.finish(submission_id_for("nightly", at(1)))
    day3 = run_due(state, now=at(3, 3, 5), submitter=cluster)
    assert [r.outcome for r in day3] == ["submitted"]
    runs = history(state, "nightly", submitter=cluster)
    assert [(r.due[:10], r.outcome, r.status) for r in runs] == [
        ("2026-01-01", "submitted", "SUCCEEDED"),
        ("2026-01-02", "skipped", ""),
        ("2026-01-03", "submitted", "RUNNING"),
    ]
    assert cluster.submits == [submission_id_for("nightly", at(1)), submission_id_for("nightly", at(3))]


def test_a_job_the_cluster_forgot_is_lost_and_frees_the_next_slot(tmp_path: Path, config_file: Path) -> None:
    """A head restarted without GCS fault tolerance forgets its jobs: a run it no longer knows at two refreshes
    in a row is LOST (a final state), so `skip` does not skip every later slot behind it. One answer without
    the job (a proxy's 404 while the head restarts) is not enough."""
    state = str(tmp_path / "state.json")
    _add(state, config_file)
    cluster = FakeCluster()
    run_due(state, now=at(1, 3, 5), submitter=cluster)
    first = submission_id_for("nightly", at(1))
    del cluster.jobs[first]  # the restarted head has no record of it
    assert [r.outcome for r in run_due(state, now=at(2, 3, 5), submitter=cluster)] == ["skipped"]
    day3 = run_due(state, now=at(3, 3, 5), submitter=cluster)
    assert [r.outcome for r in day3] == ["submitted"]
    runs = history(state, "nightly", submitter=cluster)
    assert [(r.due[:10], r.status) for r in runs] == [
        ("2026-01-01", "LOST"),
        ("2026-01-02", ""),
        ("2026-01-03", "RUNNING"),
    ]
    assert "no longer knows" in runs[0].message


def test_one_miss_then_the_job_again_keeps_it_running(tmp_path: Path, config_file: Path) -> None:
    state = str(tmp_path / "state.json")
    _add(state, config_file)
    cluster = FakeCluster()
    run_due(state, now=at(1, 3, 5), submitter=cluster)
    sid = submission_id_for("nightly", at(1))
    del cluster.jobs[sid]
    history(state, "nightly", submitter=cluster)  # one refresh without the job
    cluster.jobs[sid] = "RUNNING"  # the head is back, with its jobs
    (run,) = history(state, "nightly", submitter=cluster)
    assert (run.status, run.message) == ("RUNNING", "")


def test_queue_waits_for_the_previous_run_then_submits(tmp_path: Path, config_file: Path) -> None:
    state = str(tmp_path / "state.json")
    _add(state, config_file, concurrency="queue")
    cluster = FakeCluster()
    run_due(state, now=at(1, 3, 5), submitter=cluster)
    assert [r.outcome for r in run_due(state, now=at(2, 3, 5), submitter=cluster)] == ["queued"]
    assert run_due(state, now=at(2, 4, 0), submitter=cluster) == []  # still waiting, recorded once
    cluster.finish(submission_id_for("nightly", at(1)))
    late = run_due(state, now=at(2, 5, 0), submitter=cluster)
    assert [(r.submission_id, r.outcome) for r in late] == [
        (submission_id_for("nightly", at(2)), "submitted")
    ]


def test_replace_stops_the_previous_run(tmp_path: Path, config_file: Path) -> None:
    state = str(tmp_path / "state.json")
    _add(state, config_file, concurrency="replace")
    cluster = FakeCluster()
    run_due(state, now=at(1, 3, 5), submitter=cluster)
    assert [r.outcome for r in run_due(state, now=at(2, 3, 5), submitter=cluster)] == ["submitted"]
    assert cluster.jobs[submission_id_for("nightly", at(1))] == "STOPPED"
    first = history(state, "nightly")[0]
    assert first.status == "STOPPED" and "replaced by" in first.message


@pytest.mark.parametrize(
    ("catch_up", "now", "submitted_days", "missed"),
    [
        ("once", at(6, 3, 10), [6], 4),  # 4 missed slots (days 2-5), the latest runs once
        ("all", at(6, 3, 10), [2, 3, 4, 5, 6], 0),
        ("none", at(6, 3, 10), [], 5),  # 10 minutes late > misfire grace of 5 minutes
        ("none", at(6, 3, 2), [6], 4),
    ],
)
def test_catch_up_after_a_gap(
    tmp_path: Path, config_file: Path, catch_up: str, now: dt.datetime, submitted_days: list[int], missed: int
) -> None:
    state = str(tmp_path / "state.json")
    _add(state, config_file, catch_up=catch_up)
    cluster = FakeCluster(instant=True)  # each run ends at once, so "all" is not skipped by concurrency
    run_due(state, now=at(1, 3, 1), submitter=cluster)
    # the scheduler was down from day 1 until `now`
    new = run_due(state, now=now, submitter=cluster)
    assert cluster.submits[1:] == [submission_id_for("nightly", at(d)) for d in submitted_days]
    assert sum(r.outcome == "missed" for r in new) == missed
    assert load_state(state).schedules["nightly"].last_due == at(6).isoformat()
    assert run_due(state, now=now, submitter=cluster) == []  # and nothing more on a retry


def test_failed_submission_is_retried_with_the_same_id(tmp_path: Path, config_file: Path) -> None:
    state = str(tmp_path / "state.json")
    _add(state, config_file)
    cluster = FakeCluster()
    cluster.fail_next = 1
    failed = run_due(state, now=at(1, 3, 1), submitter=cluster)
    assert [r.outcome for r in failed] == ["failed"] and "unreachable" in failed[0].message
    retried = run_due(state, now=at(1, 3, 6), submitter=cluster)
    assert [(r.submission_id, r.outcome) for r in retried] == [
        (submission_id_for("nightly", at(1)), "submitted")
    ]


def test_serve_sleeps_until_the_next_slot(tmp_path: Path, config_file: Path) -> None:
    state = str(tmp_path / "state.json")
    add_schedule(state, "hourly", "0 * * * *", str(config_file), now=T0)
    cluster = FakeCluster(instant=True)
    clock = [T0 + dt.timedelta(minutes=30)]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += dt.timedelta(seconds=seconds)

    passes = list(
        serve(state, clock=lambda: clock[0], sleep=sleep, submitter=cluster, max_wait_s=3600, iterations=4)
    )
    assert waits[0] == 30 * 60  # from 00:30 to the 01:00 slot
    assert [len(p) for p in passes] == [0, 1, 1, 1]  # 01:00, 02:00, 03:00
    assert cluster.submits == [submission_id_for("hourly", T0 + dt.timedelta(hours=h)) for h in (1, 2, 3)]


def test_state_lives_in_object_storage(s3_bucket: str, config_file: Path) -> None:
    state = f"{s3_bucket}/maskdiet/schedules.json"
    _add(state, config_file)
    cluster = FakeCluster()
    assert [r.outcome for r in run_due(state, now=at(1, 3, 1), submitter=cluster)] == ["submitted"]
    assert load_state(state).runs("nightly")[0].status == "RUNNING"


def test_bad_schedules_are_refused(tmp_path: Path, config_file: Path) -> None:
    state = str(tmp_path / "state.json")
    with pytest.raises(ScheduleError, match="cron"):
        add_schedule(state, "x", "every night", str(config_file))
    with pytest.raises(ScheduleError, match="name"):
        add_schedule(state, "Nightly_Run", "0 3 * * *", str(config_file))
    for command in (["maskdiet", "run", "big.yaml"], ["maskdiet", "curate", "--config", "c.yaml"]):
        with pytest.raises(ScheduleError, match="names a config"):  # every slot would fail on two configs
            add_schedule(state, "x", "0 3 * * *", str(config_file), command=command)
    _add(state, config_file)
    with pytest.raises(ScheduleError, match="exists"):
        _add(state, config_file)
    with pytest.raises(ScheduleError, match="object storage"):
        export_manifest(load_state(state).schedules["nightly"], "k8s-cronjob", state_url=state)
    with pytest.raises(ScheduleError, match="local file"):  # the pod would fail every slot without it
        export_manifest(load_state(state).schedules["nightly"], "k8s-cronjob", state_url="s3://b/s.json")
    pinned = dataclasses.replace(
        load_state(state).schedules["nightly"], config="s3://b/c.yaml", address="http://127.0.0.1:8265"
    )
    with pytest.raises(ScheduleError, match="without --address"):  # it would beat the pod's head service
        export_manifest(pinned, "k8s-cronjob", state_url="s3://b/s.json")


def test_cli_add_list_export_remove(tmp_path: Path, config_file: Path) -> None:
    runner = CliRunner()
    state = f"file://{tmp_path}/state.json"
    common = ["--state", state]
    sets = ["--set", "pretrain.steps=100", "--set", "schedule.concurrency=queue", "--set", "run_id=fixed"]
    sets += [
        "--set",
        "data.storage_options.secret=not-for-the-state-file",
        "--set",
        "data.input=s3://b/my dir",
    ]
    result = runner.invoke(
        app,
        ["schedule", "add", "nightly", "--cron", "0 3 * * *", "--config", str(config_file), *common, *sets],
    )
    assert result.exit_code == 0, result.output
    assert load_state(state).schedules["nightly"].concurrency == "queue"
    assert "not-for-the-state-file" not in Path(state.removeprefix("file://")).read_text()
    result = runner.invoke(app, ["schedule", "list", *common])
    assert result.exit_code == 0 and "nightly" in result.output
    result = runner.invoke(app, ["schedule", "export", "nightly", "--format", "raycronjob", *common])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayCronJob"]  # a local config travels in a ConfigMap
    assert docs[0]["data"]["config.yaml"] == config_file.read_text()
    assert docs[1]["spec"]["schedule"] == "0 3 * * *"
    assert docs[1]["spec"]["jobTemplate"]["entrypoint"] == (
        "maskdiet run --previous latest --set pretrain.steps=100 --set 'data.input=s3://b/my dir' "
        "--config /etc/maskdiet/config.yaml"
    )  # a --set outside schedule.* runs with every slot (not run_id: each slot has its own; not secrets)
    result = runner.invoke(app, ["schedule", "remove", "nightly", *common])
    assert result.exit_code == 0
    assert load_state(state).schedules == {}


def test_run_due_against_the_real_ray_head(ray_head: str, tmp_path: Path) -> None:
    """Real submission: a doubled and a racing run-due leave one job on the cluster, and history follows it."""
    out = tmp_path / "nightly-images"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "unused")}))
    state = str(tmp_path / "state.json")
    name = f"real-{int(time.time()) % 100000}"
    add_schedule(
        state,
        name,
        "*/5 * * * *",
        str(config),
        address=ray_head,
        command=["maskdiet", "demo-data", str(out), "--per-class", "3", "--format", "png"],
        now=T0,
    )
    snapshot = tmp_path / "snapshot.json"
    shutil.copyfile(state, snapshot)
    runner = CliRunner()
    result = runner.invoke(app, ["schedule", "run-due", "--state", state, "--now", "2026-01-01T00:05:30"])
    assert result.exit_code == 0, result.output
    sid = submission_id_for(name, T0 + dt.timedelta(minutes=5))
    assert sid in result.output
    assert run_due(state, now=T0 + dt.timedelta(minutes=6)) == []  # doubled run-due: nothing new
    shutil.copyfile(snapshot, state)  # a racing scheduler with the old state
    racing = run_due(state, now=T0 + dt.timedelta(minutes=6))
    assert [(r.submission_id, r.outcome) for r in racing] == [(sid, "submitted")]
    client = jobs.connect(ray_head)
    assert [j.submission_id for j in jobs.list_jobs(client)].count(sid) == 1
    assert jobs.wait_for(client, sid, timeout=240) == "SUCCEEDED", jobs.job_logs(client, sid)
    assert len(list(out.glob("*/*.png"))) == 30  # 10 digit classes × 3
    runs = history(state, name, submitter=RayJobsSubmitter())
    assert [(r.submission_id, r.outcome, r.status) for r in runs] == [(sid, "submitted", "SUCCEEDED")]
    info = client.get_job_info(sid)
    assert info.metadata["schedule"] == name
    assert info.entrypoint.endswith(f"--config {jobs.CONFIG_NAME}")
