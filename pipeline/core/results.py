"""`result.json`: where a finished command says what it produced, for programs to read.

Each run-producing command (`curate`, `pretrain`, `run`, `sweep`) writes one `result.json` into the folder it
wrote to, right after its flow returns. A program that knows that folder (e.g. `maskdiet jobs status`, which
knows a job's output URL and run id from its submission) learns the outputs by reading this file, not by
parsing the lines the command printed for people (those wrap, get coloured, and change wording).

Shape (JSON object):
    version   RESULT_VERSION
    command   the command that wrote it: curate | pretrain | run | sweep
    run_id    the run's id or name (a job's is its submission id): a reader checks it is the run it expects,
              because several runs can share one output folder and the latest one's file wins
    outputs   {name: URL} of what the run produced, e.g. manifest, quarantine, encoder, run_dir, report
    written   UTC time the file was written (ISO 8601)
    ...       any other keys the command adds (e.g. `summary`)

The write is atomic (`atomic_write_bytes`): a reader sees the previous file or the whole new one.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from typing import Any

from pipeline.core.errors import MaskdietError
from pipeline.core.storage import atomic_write_bytes, exists, join, read_bytes

RESULT_NAME = "result.json"
RESULT_VERSION = 1


class ResultError(MaskdietError):
    """A result.json that cannot be used (not JSON, another version); the message names the file."""


def result_url(dir_url: str) -> str:
    """Where the result of a command that wrote into `dir_url` lives."""
    return join(dir_url, RESULT_NAME)


def _plain(value: Any) -> Any:
    """`value` as strict JSON: NaN and infinities (a run that logged no loss) become null, numpy scalars
    plain numbers, anything else unknown its string; other JSON readers refuse a bare NaN."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def write_result(
    dir_url: str,
    payload: Mapping[str, Any],
    storage_options: dict[str, Any] | None = None,
    *,
    now: dt.datetime | None = None,
) -> str:
    """Write `payload` (with `command`, `run_id` and `outputs`) as `dir_url/result.json`, atomically;
    returns its URL. `version` and `written` are added here."""
    for key in ("command", "run_id", "outputs"):
        if key not in payload:
            raise ValueError(f"a result needs {key!r}; got keys {sorted(payload)}")
    body = {
        "version": RESULT_VERSION,
        **_plain(payload),
        "written": (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(timespec="seconds"),
    }
    body["outputs"] = {k: v for k, v in body["outputs"].items() if v is not None}
    url = result_url(dir_url)
    text = json.dumps(body, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(url, text.encode(), storage_options)
    return url


def read_result(dir_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The result a command wrote into `dir_url`; None when there is none (yet)."""
    url = result_url(dir_url)
    if not exists(url, storage_options):
        return None
    try:
        data = json.loads(read_bytes(url, storage_options))
    except ValueError as e:
        raise ResultError(f"{url} is not JSON ({e}): was it written by maskdiet?") from None
    if not isinstance(data, dict) or data.get("version") != RESULT_VERSION:
        found = data.get("version") if isinstance(data, dict) else type(data).__name__
        raise ResultError(f"{url} has version {found}, expected {RESULT_VERSION}")
    if not isinstance(data.get("outputs"), dict):
        raise ResultError(f"{url} has no 'outputs' object")
    return data
