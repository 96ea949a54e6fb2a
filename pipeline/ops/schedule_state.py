"""The schedule state store: schedules and their run history, one JSON object at an fsspec URL.

The store knows what a schedule and a recorded run are, how they are written and read, and where the state
lives; it knows nothing of cron or of clusters (`schedule_policy` decides what to record, `schedule_export`
turns a schedule into Kubernetes manifests).

Where: default `~/.maskdiet/schedules.json`; on a cluster, e.g. `s3://bucket/maskdiet/schedules.json`.
Written whole with `pipeline.core.storage.atomic_write_bytes`, so a reader never sees half of it. Why not
SQLite: the scheduler runs where there is often no persistent disk (a Kubernetes CronJob pod, a laptop, a CI
runner); an object in the same bucket as the data survives all of them and needs no volume. The state is
small (schedules plus a capped history). There is no lock: writes are last-writer-wins, and the cluster's
refusal of duplicate submission ids, not the state, is what guarantees "submit once" (see `schedule_policy`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserInputError
from pipeline.core.storage import atomic_write_bytes, exists, read_bytes

STATE_VERSION = 1
HISTORY_LIMIT = 200  # runs kept per schedule in the state
DEFAULT_COMMAND = ("maskdiet", "run", "--previous", "latest")  # --config C is added at submission


class ScheduleError(UserInputError):
    """A schedule is unknown, malformed or conflicts with another; the message names it."""


# ---------------------------------------------------------------------------------------------- time


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso_time(t: dt.datetime) -> str:
    """How the state writes a time: ISO 8601 in UTC, to the second."""
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def parse_time(text: str) -> dt.datetime:
    """A time the state wrote (or a user typed); a naive time is taken as UTC, as every schedule is."""
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
        """Append `run`, dropping the schedule's oldest runs beyond `HISTORY_LIMIT` (the state stays small)."""
        self.history.append(run)
        mine = self.runs(run.schedule)
        if len(mine) > HISTORY_LIMIT:
            drop = {id(r) for r in mine[: len(mine) - HISTORY_LIMIT]}
            self.history = [r for r in self.history if id(r) not in drop]
        return run


def get_schedule(state: State, name: str) -> Schedule:
    """The schedule named `name`; a `ScheduleError` listing the known ones when there is none."""
    if name not in state.schedules:
        known = ", ".join(sorted(state.schedules)) or "none"
        raise ScheduleError(f"no schedule named {name!r} (known: {known})")
    return state.schedules[name]


# ---------------------------------------------------------------------------------------------- store


def default_state_url() -> str:
    return str(Path.home() / ".maskdiet" / "schedules.json")


def state_url_from(config_state: str | None, override: str | None = None) -> str:
    """`--state`, else `schedule.state` from the config, else MASKDIET_SCHEDULE_STATE, else the default."""
    return override or config_state or os.environ.get("MASKDIET_SCHEDULE_STATE") or default_state_url()


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
    """Write the whole state in one atomic put: a reader sees the old state or the new one."""
    data = {
        "version": STATE_VERSION,
        "schedules": {n: dataclasses.asdict(s) for n, s in sorted(state.schedules.items())},
        "history": [dataclasses.asdict(r) for r in state.history],
    }
    atomic_write_bytes(url, json.dumps(data, indent=1).encode(), storage_options)
