"""The schedule policy engine: which cron slots are due, and what to do with each (submit, skip, queue, miss).

`run_due(state_url, now=...)` is the whole scheduler: it looks at each schedule's cron slots since the last
one it handled, decides per the catch-up and concurrency policies, submits what is due and records every
outcome in the state store (`schedule_state`). `maskdiet schedule run-due` (system cron, a Kubernetes
CronJob) calls it once; `serve` calls it in a loop. Each scheduled run is `maskdiet run --config C
--previous latest`: incremental over the previous run's manifest and score cache.

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

The cluster is reached through a `Submitter` (the real one: `RayJobsSubmitter`, over `pipeline.ops.jobs`),
so the policies are tested with a clock and an in-memory cluster.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from pipeline.ops.schedule_state import (
    DEFAULT_COMMAND,
    Run,
    Schedule,
    ScheduleError,
    State,
    get_schedule,
    iso_time,
    load_state,
    parse_time,
    save_state,
    utcnow,
)

log = logging.getLogger(__name__)

CONCURRENCY = ("skip", "queue", "replace")
CATCH_UP = ("once", "all", "none")
ACTIVE = frozenset({"PENDING", "RUNNING"})
# LOST: the cluster no longer knows the job (its head restarted without GCS fault tolerance); a run is LOST
# when two refreshes in a row get no such job, so one proxy 404 during a restart does not end it
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED", "LOST"})
UNKNOWN_ONCE = "not found on the cluster once"
# Kubernetes names and Ray submission ids both accept this: lower-case DNS labels.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")

Clock = Callable[[], dt.datetime]


# ---------------------------------------------------------------------------------------------- edits


def _check_cron(cron: str) -> None:
    from croniter import croniter

    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise ScheduleError(f"bad cron expression {cron!r}: expected 5 fields, e.g. '0 3 * * *' (03:00 UTC)")


def _check_schedule(name: str, cron: str, concurrency: str, catch_up: str, command: list[str]) -> None:
    """Refuse a schedule that would fail at every slot, before it is stored."""
    if not _NAME.match(name):
        raise ScheduleError(
            f"bad schedule name {name!r}: lower-case letters, digits and '-', at most 40 (it names jobs and "
            "Kubernetes objects)"
        )
    _check_cron(cron)
    if concurrency not in CONCURRENCY:
        raise ScheduleError(f"bad concurrency {concurrency!r}: expected skip, queue or replace")
    if catch_up not in CATCH_UP:
        raise ScheduleError(f"bad catch_up {catch_up!r}: expected once, all or none")
    from pipeline.ops.jobs import names_a_config

    if names_a_config(command):  # each slot adds --config: two would fail every slot
        raise ScheduleError(f"the command {shlex.join(command)!r} names a config: the schedule adds --config")


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
    command = list(command or DEFAULT_COMMAND)
    _check_schedule(name, cron, concurrency, catch_up, command)
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
        command=command,
        concurrency=concurrency,
        catch_up=catch_up,
        misfire_grace_s=misfire_grace_s,
        created=iso_time(now or utcnow()),
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
                run.message = f"{UNKNOWN_ONCE} at {iso_time(dt.datetime.now(dt.UTC))}"
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
        state.record(Run(s.name, iso_time(slot), sid, outcome, iso_time(now), status, message))

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


def _slots_to_run(s: Schedule, slots: list[dt.datetime], now: dt.datetime) -> list[dt.datetime]:
    """The due slots the catch-up policy runs; the others are recorded as missed."""
    if s.catch_up == "all":
        return slots
    if s.catch_up == "once":
        return slots[-1:]
    return [t for t in slots[-1:] if (now - t).total_seconds() <= s.misfire_grace_s]


def _run_schedule(state: State, s: Schedule, now: dt.datetime, submitter: Submitter) -> None:
    slots = due_slots(s.cron, parse_time(s.last_due or s.created), now)
    if not slots:
        return
    to_run = _slots_to_run(s, slots, now)
    for slot in slots:
        if slot in to_run:
            continue
        sid = submission_id_for(s.name, slot)
        state.record(
            Run(s.name, iso_time(slot), sid, "missed", iso_time(now), message=f"catch_up={s.catch_up}")
        )
        s.last_due = iso_time(slot)
    for slot in to_run:
        if not _handle_slot(state, s, slot, now, submitter):
            return  # retry this slot (queued or failed) on the next run-due
        s.last_due = iso_time(slot)


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
