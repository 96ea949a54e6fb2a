"""Recurring maskdiet runs: cron schedules that submit Ray jobs, with history, and their Kubernetes manifests.

`run_due(state_url, now=...)` is the whole scheduler: it looks at each schedule's cron slots since the last
one it handled, decides per the catch-up and concurrency policies, submits what is due and records every
outcome. `maskdiet schedule run-due` (system cron, a Kubernetes CronJob) calls it once; `serve` calls it in a
loop. Each scheduled run is `maskdiet run --config C --previous latest`: incremental over the previous run's
manifest and score cache.

Semantics:
- **Idempotent**: a slot's submission id is a pure function of (schedule, due time), e.g.
  `maskdiet-nightly-20260102T0300Z`. A doubled or retried `run-due` finds the slot handled in the state, and
  two schedulers racing on the same state still submit once: Ray refuses a second job with the same id, and
  we record the slot as submitted when the cluster already has it.
- **Concurrency** (previous run of the same schedule still PENDING/RUNNING): `skip` records the new slot as
  `skipped`; `queue` records it as `queued` and submits it on the first `run-due` after the previous run
  ended; `replace` stops the previous run, then submits.
- **Catch-up** after downtime (several slots due at once): `once` (default) runs the latest slot and records
  the older ones as `missed`; `all` runs each slot in order; `none` runs a slot only if it is at most
  `schedule.misfire_grace_s` old.
- A failed submission (cluster unreachable) is recorded as `failed` and retried by the next `run-due` with
  the same submission id.

State store: one JSON object at an fsspec URL (default `~/.maskdiet/schedules.json`; on a cluster, e.g.
`s3://bucket/maskdiet/schedules.json`), written whole with `pipeline.core.storage.atomic_write_bytes`. Why not
SQLite: the scheduler runs where there is often no persistent disk (a Kubernetes CronJob pod, a laptop, a CI
runner); an object in the same bucket as the data survives all of them, needs no volume, and a reader never
sees half of it. The state is small (schedules plus a capped history). Writes are last-writer-wins; the
cluster's refusal of duplicate submission ids, not the state, is what guarantees "submit once".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from pipeline.core.errors import UserInputError
from pipeline.core.storage import atomic_write_bytes, exists, read_bytes

log = logging.getLogger(__name__)

STATE_VERSION = 1
HISTORY_LIMIT = 200  # runs kept per schedule in the state
DEFAULT_COMMAND = ("maskdiet", "run", "--previous", "latest")  # --config C is added at submission
ACTIVE = frozenset({"PENDING", "RUNNING"})
# LOST: the cluster no longer knows the job (its head restarted without GCS fault tolerance); a run is LOST
# when two refreshes in a row get no such job, so one proxy 404 during a restart does not end it
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED", "LOST"})
UNKNOWN_ONCE = "not found on the cluster once"
# Kubernetes names and Ray submission ids both accept this: lower-case DNS labels.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")

Clock = Callable[[], dt.datetime]


class ScheduleError(UserInputError):
    """A schedule is unknown, malformed or conflicts with another; the message names it."""


def default_state_url() -> str:
    return str(Path.home() / ".maskdiet" / "schedules.json")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def _parse(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# ---------------------------------------------------------------------------------------------- model


@dataclass
class Schedule:
    """One recurring run. Times are UTC; `cron` is a standard 5-field expression."""

    name: str
    cron: str
    config: str  # config URL (or absolute local path) of the scheduled run
    address: str | None = None  # Jobs API URL; None: RAY_API_SERVER_ADDRESS or the local default
    command: list[str] = field(default_factory=lambda: list(DEFAULT_COMMAND))
    concurrency: str = "skip"  # skip | queue | replace
    catch_up: str = "once"  # once | all | none
    misfire_grace_s: int = 300  # catch_up=none: a slot older than this is missed
    created: str = ""  # ISO time; the first slot is the first one after it
    last_due: str | None = None  # the latest slot handled (submitted, skipped or missed)


@dataclass
class Run:
    """One slot's outcome. `outcome` is what the scheduler did; `status` the job's last known state."""

    schedule: str
    due: str  # ISO time of the slot
    submission_id: str
    outcome: str  # submitted | skipped | queued | missed | failed
    at: str  # when the scheduler recorded it
    status: str = ""  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED | LOST (submitted runs only)
    message: str = ""


@dataclass
class State:
    schedules: dict[str, Schedule] = field(default_factory=dict)
    history: list[Run] = field(default_factory=list)

    def runs(self, name: str) -> list[Run]:
        return [r for r in self.history if r.schedule == name]

    def record(self, run: Run) -> Run:
        self.history.append(run)
        mine = self.runs(run.schedule)
        if len(mine) > HISTORY_LIMIT:
            drop = {id(r) for r in mine[: len(mine) - HISTORY_LIMIT]}
            self.history = [r for r in self.history if id(r) not in drop]
        return run


def load_state(url: str, storage_options: dict[str, Any] | None = None) -> State:
    """The state at `url`; an empty state when the object does not exist yet."""
    if not exists(url, storage_options):
        return State()
    data = json.loads(read_bytes(url, storage_options))
    if data.get("version") != STATE_VERSION:
        raise ScheduleError(
            f"schedule state {url} has version {data.get('version')}, expected {STATE_VERSION}"
        )
    return State(
        schedules={n: Schedule(**s) for n, s in data.get("schedules", {}).items()},
        history=[Run(**r) for r in data.get("history", [])],
    )


def save_state(url: str, state: State, storage_options: dict[str, Any] | None = None) -> None:
    data = {
        "version": STATE_VERSION,
        "schedules": {n: dataclasses.asdict(s) for n, s in sorted(state.schedules.items())},
        "history": [dataclasses.asdict(r) for r in state.history],
    }
    atomic_write_bytes(url, json.dumps(data, indent=1).encode(), storage_options)


# ---------------------------------------------------------------------------------------------- edits


def _check_cron(cron: str) -> None:
    from croniter import croniter

    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise ScheduleError(f"bad cron expression {cron!r}: expected 5 fields, e.g. '0 3 * * *' (03:00 UTC)")


def add_schedule(
    state_url: str,
    name: str,
    cron: str,
    config: str,
    *,
    address: str | None = None,
    command: list[str] | None = None,
    concurrency: str = "skip",
    catch_up: str = "once",
    misfire_grace_s: int = 300,
    replace: bool = False,
    now: dt.datetime | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Schedule:
    """Add (or with `replace`, redefine) a schedule; its first slot is the first one after `now`."""
    if not _NAME.match(name):
        raise ScheduleError(
            f"bad schedule name {name!r}: lower-case letters, digits and '-', at most 40 (it names jobs and "
            "Kubernetes objects)"
        )
    _check_cron(cron)
    if concurrency not in ("skip", "queue", "replace"):
        raise ScheduleError(f"bad concurrency {concurrency!r}: expected skip, queue or replace")
    if catch_up not in ("once", "all", "none"):
        raise ScheduleError(f"bad catch_up {catch_up!r}: expected once, all or none")
    from pipeline.ops.jobs import names_a_config

    if names_a_config(list(command or DEFAULT_COMMAND)):  # each slot adds --config: two would fail every slot
        raise ScheduleError(
            f"the command {shlex.join(command or [])!r} names a config: the schedule adds --config"
        )
    if "://" not in config:
        if not Path(config).is_file():
            raise ScheduleError(f"config file not found: {config}")
        config = str(Path(config).resolve())
    state = load_state(state_url, storage_options)
    if name in state.schedules and not replace:
        raise ScheduleError(f"schedule {name!r} exists; remove it first or pass --replace")
    schedule = Schedule(
        name=name,
        cron=cron,
        config=config,
        address=address,
        command=list(command or DEFAULT_COMMAND),
        concurrency=concurrency,
        catch_up=catch_up,
        misfire_grace_s=misfire_grace_s,
        created=_iso(now or utcnow()),
    )
    state.schedules[name] = schedule
    save_state(state_url, state, storage_options)
    return schedule


def remove_schedule(state_url: str, name: str, storage_options: dict[str, Any] | None = None) -> None:
    """Forget a schedule (its history stays, for the record)."""
    state = load_state(state_url, storage_options)
    get_schedule(state, name)
    del state.schedules[name]
    save_state(state_url, state, storage_options)


def get_schedule(state: State, name: str) -> Schedule:
    if name not in state.schedules:
        known = ", ".join(sorted(state.schedules)) or "none"
        raise ScheduleError(f"no schedule named {name!r} (known: {known})")
    return state.schedules[name]


# ---------------------------------------------------------------------------------------------- slots


def submission_id_for(name: str, due: dt.datetime) -> str:
    """The one submission id of a (schedule, slot): retries and doubled schedulers reuse it."""
    return f"maskdiet-{name}-{due.astimezone(dt.UTC):%Y%m%dT%H%MZ}"


def due_slots(cron: str, after: dt.datetime, now: dt.datetime, limit: int = 1000) -> list[dt.datetime]:
    """Cron slots in (after, now], oldest first; at most the `limit` most recent."""
    from croniter import croniter

    it = croniter(cron, after.astimezone(dt.UTC))
    slots: list[dt.datetime] = []
    while True:
        t = it.get_next(dt.datetime)
        if t > now:
            return slots[-limit:]
        slots.append(t)


def next_slot(schedule: Schedule, now: dt.datetime) -> dt.datetime:
    from croniter import croniter

    return croniter(schedule.cron, now.astimezone(dt.UTC)).get_next(dt.datetime)


# ---------------------------------------------------------------------------------------------- submit


class Submitter(Protocol):
    """How the scheduler talks to the cluster; injectable for tests (the real one is `RayJobsSubmitter`)."""

    def submit(self, schedule: Schedule, submission_id: str) -> bool:
        """Submit the schedule's run under this id; False if a job with this id already existed."""
        ...

    def status(self, schedule: Schedule, submission_id: str) -> str | None:
        """The job's state, or None if the cluster has no job with this id."""
        ...

    def stop(self, schedule: Schedule, submission_id: str) -> None: ...


class RayJobsSubmitter:
    """Submits through the Ray Jobs API (`pipeline.ops.jobs`), one client per cluster address."""

    def __init__(self) -> None:
        self._clients: dict[str | None, Any] = {}

    def _client(self, schedule: Schedule) -> Any:
        from pipeline.ops.jobs import connect

        if schedule.address not in self._clients:
            self._clients[schedule.address] = connect(schedule.address)
        return self._clients[schedule.address]

    def submit(self, schedule: Schedule, submission_id: str) -> bool:
        from pipeline.ops.jobs import JobsError, submit

        try:
            submit(
                self._client(schedule),
                schedule.command,
                config=schedule.config,
                submission_id=submission_id,
                metadata={"schedule": schedule.name},
            )
        except JobsError as e:
            if "already exists" in str(e):
                return False
            raise
        return True

    def status(self, schedule: Schedule, submission_id: str) -> str | None:
        from pipeline.ops.jobs import job_exists, job_status

        client = self._client(schedule)
        if not job_exists(client, submission_id):
            return None
        return job_status(client, submission_id, with_outputs=False).status

    def stop(self, schedule: Schedule, submission_id: str) -> None:
        from pipeline.ops.jobs import stop

        stop(self._client(schedule), submission_id, wait=60.0)


def refresh(state: State, submitter: Submitter, name: str | None = None) -> None:
    """Update the last known status of submitted runs that had not finished (errors leave them as they were)."""
    for run in state.history:
        if run.outcome != "submitted" or run.status in TERMINAL or (name and run.schedule != name):
            continue
        schedule = state.schedules.get(run.schedule)
        if schedule is None:
            continue
        try:
            status = submitter.status(schedule, run.submission_id)
        except Exception as e:  # an unreachable cluster must not stop the other schedules
            log.warning("cannot refresh %s: %s", run.submission_id, e)
            continue
        if status is None:  # answered, but without this job
            if run.message.startswith(UNKNOWN_ONCE):  # the second answer in a row: it will never finish
                run.status = "LOST"
                run.message = "the cluster no longer knows this job (was its head restarted?)"
                log.warning("%s: %s", run.submission_id, run.message)
            else:  # maybe a proxy's 404 while the head restarts: ask again at the next refresh
                run.message = f"{UNKNOWN_ONCE} at {_iso(dt.datetime.now(dt.UTC))}"
        else:
            run.status = status
            if run.message.startswith(UNKNOWN_ONCE):
                run.message = ""


def _handle_slot(
    state: State, s: Schedule, slot: dt.datetime, now: dt.datetime, submitter: Submitter
) -> bool:
    """Act on one due slot; returns True when the slot is done (advance `last_due`), False to retry later."""
    sid = submission_id_for(s.name, slot)
    here = [r for r in state.runs(s.name) if r.submission_id == sid]

    def record(outcome: str, status: str = "", message: str = "") -> None:
        state.record(Run(s.name, _iso(slot), sid, outcome, _iso(now), status, message))

    if any(r.outcome in ("submitted", "skipped") for r in here):
        return True  # handled by an earlier run-due
    active = [
        r
        for r in state.runs(s.name)
        if r.outcome == "submitted" and r.status in ACTIVE and r.submission_id != sid
    ]
    if active:
        previous = ", ".join(f"{r.submission_id} ({r.status})" for r in active)
        if s.concurrency == "skip":
            record("skipped", message=f"previous run still active: {previous}")
            return True
        if s.concurrency == "queue":
            if not any(r.outcome == "queued" for r in here):
                record("queued", message=f"waits for {previous}")
            return False
        for r in active:  # replace
            submitter.stop(s, r.submission_id)
            r.status = "STOPPED"
            r.message = (r.message + f"; replaced by {sid}").lstrip("; ")
    try:
        existing = submitter.status(s, sid)
        if existing is not None:
            record("submitted", existing, "already on the cluster (submitted by another scheduler)")
            return True
        fresh = submitter.submit(s, sid)
    except Exception as e:
        record("failed", message=f"{type(e).__name__}: {e}")
        log.warning("schedule %s: submitting %s failed: %s", s.name, sid, e)
        return False
    try:
        status = submitter.status(s, sid) or "PENDING"
    except Exception:  # submitted; its status is refreshed by the next run-due
        status = "PENDING"
    record("submitted", status, "" if fresh else "already on the cluster (submitted by another scheduler)")
    log.info("schedule %s: submitted %s", s.name, sid)
    return True


def _run_schedule(state: State, s: Schedule, now: dt.datetime, submitter: Submitter) -> None:
    slots = due_slots(s.cron, _parse(s.last_due or s.created), now)
    if not slots:
        return
    if s.catch_up == "all":
        to_run = slots
    elif s.catch_up == "once":
        to_run = slots[-1:]
    else:
        to_run = [t for t in slots[-1:] if (now - t).total_seconds() <= s.misfire_grace_s]
    for slot in slots:
        if slot in to_run:
            continue
        sid = submission_id_for(s.name, slot)
        state.record(Run(s.name, _iso(slot), sid, "missed", _iso(now), message=f"catch_up={s.catch_up}"))
        s.last_due = _iso(slot)
    for slot in to_run:
        if not _handle_slot(state, s, slot, now, submitter):
            return  # retry this slot (queued or failed) on the next run-due
        s.last_due = _iso(slot)


def run_due(
    state_url: str,
    *,
    now: dt.datetime | None = None,
    submitter: Submitter | None = None,
    only: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[Run]:
    """Submit every due slot of every schedule (or of `only`), record the outcomes; returns the new records."""
    now = now or utcnow()
    submitter = submitter or RayJobsSubmitter()
    state = load_state(state_url, storage_options)
    if only is not None:
        get_schedule(state, only)
    old = {id(r) for r in state.history}
    refresh(state, submitter, only)
    for name, schedule in sorted(state.schedules.items()):
        if only is None or name == only:
            _run_schedule(state, schedule, now, submitter)
    save_state(state_url, state, storage_options)
    return [r for r in state.history if id(r) not in old]


def serve(
    state_url: str,
    *,
    clock: Clock = utcnow,
    sleep: Callable[[float], None] = time.sleep,
    submitter: Submitter | None = None,
    max_wait_s: float = 60.0,
    iterations: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[list[Run]]:
    """The long-running scheduler: `run_due`, then sleep until the next slot (at most `max_wait_s`, so
    schedules added meanwhile are seen). Yields each pass's new records; stops after `iterations` passes."""
    submitter = submitter or RayJobsSubmitter()
    done = 0
    while iterations is None or done < iterations:
        yield run_due(state_url, now=clock(), submitter=submitter, storage_options=storage_options)
        done += 1
        now = clock()
        state = load_state(state_url, storage_options)
        upcoming = [next_slot(s, now) for s in state.schedules.values()]
        wait = min([(t - now).total_seconds() for t in upcoming] + [max_wait_s])
        sleep(max(wait, 0.5))


def history(
    state_url: str,
    name: str,
    *,
    submitter: Submitter | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[Run]:
    """The schedule's runs, oldest first; with a `submitter`, unfinished runs' statuses are refreshed first."""
    state = load_state(state_url, storage_options)
    if name not in state.schedules and not state.runs(name):
        get_schedule(state, name)
    if submitter is not None:
        refresh(state, submitter, name)
        save_state(state_url, state, storage_options)
    return state.runs(name)


# ---------------------------------------------------------------------------------------------- export

DEFAULT_IMAGE = "maskdiet:0.1.0"  # built by infra/Dockerfile; push it to your registry and pass --image
RAY_VERSION = "2.60.0"
CLUSTER_NAME = "maskdiet"  # KubeRay names the head Service <cluster>-head-svc
TOKEN_SECRET = "maskdiet-ray-token"  # Secret with key `auth_token`: the cluster's Ray token
S3_SECRET = "maskdiet-s3"  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL
CONFIG_MOUNT = "/etc/maskdiet"
EXPORT_FORMATS = ("raycronjob", "k8s-cronjob", "rayjob")


def _container(name: str, image: str, resources: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "envFrom": [{"secretRef": {"name": S3_SECRET, "optional": True}}],
        "resources": resources,
        **extra,
    }


def ray_cluster_spec(image: str = DEFAULT_IMAGE, config_map: str | None = None) -> dict[str, Any]:
    """The RayCluster spec maskdiet runs on: a CPU head (runs the job driver, schedules, no GPU), an
    autoscaled GPU worker group for pretraining and scoring, and an autoscaled CPU group for decode.

    With `config_map`, the head mounts it at /etc/maskdiet (the job driver reads its config there).
    """
    head_extra: dict[str, Any] = {
        "ports": [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
        ]
    }
    head_spec: dict[str, Any] = {}
    if config_map:
        head_extra["volumeMounts"] = [
            {"name": "maskdiet-config", "mountPath": CONFIG_MOUNT, "readOnly": True}
        ]
        head_spec["volumes"] = [{"name": "maskdiet-config", "configMap": {"name": config_map}}]
    head = _container(
        "ray-head",
        image,
        {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
        **head_extra,
    )
    gpu = _container(
        "ray-worker",
        image,
        {
            "requests": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"},
        },
    )
    cpu = _container(
        "ray-worker",
        image,
        {"requests": {"cpu": "8", "memory": "16Gi"}, "limits": {"cpu": "8", "memory": "16Gi"}},
    )
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "authOptions": {"mode": "token", "secretName": TOKEN_SECRET},
        "headGroupSpec": {
            # num-cpus 0: the head schedules and runs job drivers; Ray Data and Train go to workers
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {"containers": [head], **head_spec}},
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 4,
                "rayStartParams": {},
                "template": {
                    "spec": {
                        "containers": [gpu],
                        "tolerations": [
                            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                        ],
                    }
                },
            },
            {
                "groupName": "cpu",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 8,
                "rayStartParams": {},
                "template": {"spec": {"containers": [cpu]}},
            },
        ],
    }


def _config_ref(schedule: Schedule) -> tuple[str, dict[str, Any] | None]:
    """How the pod sees the config: a URL as is; a local file shipped in a ConfigMap (returned too)."""
    if "://" in schedule.config:
        return schedule.config, None
    text = Path(schedule.config).read_text()
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"maskdiet-{schedule.name}-config"},
        "data": {"config.yaml": text},
    }
    return f"{CONFIG_MOUNT}/config.yaml", config_map


def rayjob_spec(schedule: Schedule, image: str = DEFAULT_IMAGE) -> tuple[dict[str, Any], dict | None]:
    """A RayJob spec running the schedule's command on a fresh cluster that is deleted when it ends."""
    config, config_map = _config_ref(schedule)
    cluster = ray_cluster_spec(image, config_map["metadata"]["name"] if config_map else None)
    entrypoint = shlex.join([*schedule.command, "--config", config])
    spec = {
        "entrypoint": entrypoint,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        "activeDeadlineSeconds": 12 * 3600,
        "backoffLimit": 1,
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": cluster,
    }
    return spec, config_map


def export_manifest(
    schedule: Schedule,
    fmt: str,
    *,
    image: str = DEFAULT_IMAGE,
    state_url: str | None = None,
    namespace: str | None = None,
) -> str:
    """The Kubernetes manifest(s) for the schedule, as multi-document YAML.

    - `rayjob`: one RayJob (a single run now; `kubectl create` it again for the next).
    - `raycronjob`: a RayCronJob (KubeRay >= 1.6, alpha, feature gate RayCronJob=true): KubeRay creates a RayJob
      (with its own cluster) on each cron slot. No skip/queue or history of ours: use k8s-cronjob for those.
    - `k8s-cronjob`: a plain CronJob that runs `maskdiet schedule run-due --only NAME` at each slot against a
      long-lived RayCluster (infra/k8s/raycluster.yaml): our idempotent ids, concurrency policy and history.
    """
    if fmt not in EXPORT_FORMATS:
        raise ScheduleError(f"unknown format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    meta: dict[str, Any] = {
        "name": f"maskdiet-{schedule.name}",
        "labels": {"app.kubernetes.io/name": "maskdiet"},
    }
    if namespace:
        meta["namespace"] = namespace
    docs: list[dict[str, Any]] = []
    if fmt in ("rayjob", "raycronjob"):
        spec, config_map = rayjob_spec(schedule, image)
        if config_map:
            docs.append(config_map)
        if fmt == "rayjob":
            docs.append({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": spec})
        else:
            docs.append(
                {
                    "apiVersion": "ray.io/v1",
                    "kind": "RayCronJob",
                    "metadata": meta,
                    "spec": {"schedule": schedule.cron, "jobTemplate": spec},
                }
            )
    else:
        if not state_url or "://" not in state_url:
            raise ScheduleError(
                "a k8s-cronjob needs the schedule state in object storage (the pod has no disk that lasts): "
                "pass --state s3://bucket/maskdiet/schedules.json"
            )
        if schedule.address:
            raise ScheduleError(
                f"schedule {schedule.name} stores --address {schedule.address}, which would win over the "
                f"CronJob's in-cluster head service ({CLUSTER_NAME}-head-svc): add it again without --address"
            )
        if "://" not in schedule.config:
            raise ScheduleError(
                f"a k8s-cronjob's pod submits the schedule's config, and {schedule.config} is a local file it "
                "does not have: add the schedule with --config s3://bucket/config.yaml (or export a raycronjob, "
                "which ships the file in a ConfigMap)"
            )
        policy = {"skip": "Forbid", "queue": "Forbid", "replace": "Replace"}[schedule.concurrency]
        container = {
            "name": "run-due",
            "image": image,
            "command": ["maskdiet", "schedule", "run-due", "--state", state_url, "--only", schedule.name],
            "env": [
                {"name": "RAY_API_SERVER_ADDRESS", "value": f"http://{CLUSTER_NAME}-head-svc:8265"},
                {
                    "name": "RAY_AUTH_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": "auth_token"}},
                },
            ],
            "envFrom": [{"secretRef": {"name": S3_SECRET, "optional": True}}],
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        }
        docs.append(
            {
                "apiVersion": "batch/v1",
                "kind": "CronJob",
                "metadata": meta,
                "spec": {
                    "schedule": schedule.cron,
                    "timeZone": "Etc/UTC",
                    "concurrencyPolicy": policy,
                    "startingDeadlineSeconds": 3600,
                    "successfulJobsHistoryLimit": 3,
                    "failedJobsHistoryLimit": 3,
                    "jobTemplate": {
                        "spec": {
                            "backoffLimit": 2,
                            "template": {"spec": {"restartPolicy": "OnFailure", "containers": [container]}},
                        }
                    },
                },
            }
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


def state_url_from(config_state: str | None, override: str | None = None) -> str:
    """`--state`, else `schedule.state` from the config, else MASKDIET_SCHEDULE_STATE, else the default."""
    return override or config_state or os.environ.get("MASKDIET_SCHEDULE_STATE") or default_state_url()
