"""result.json: what a finished command says it produced, written atomically and read back by programs."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.results import RESULT_NAME, ResultError, read_result, result_url, write_result

WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_write_then_read(tmp_path: Path) -> None:
    out = tmp_path / "out"
    url = write_result(
        str(out),
        {
            "command": "run",
            "run_id": "r1",
            "outputs": {"manifest": "s3://b/m.parquet", "report": None},  # None: not produced
            "summary": {"first_loss": math.nan, "kept": np.int64(3), "accuracy": np.float32(0.5)},
        },
        now=WHEN,
    )
    assert url == result_url(str(out)) == str(out / RESULT_NAME)
    assert [p.name for p in out.iterdir()] == [RESULT_NAME]  # no temporary file left behind
    raw = json.loads((out / RESULT_NAME).read_text())  # strict JSON: no bare NaN
    assert raw["summary"] == {"first_loss": None, "kept": 3, "accuracy": 0.5}
    assert raw["written"] == "2026-01-02T03:04:05+00:00"
    result = read_result(str(out))
    assert result is not None
    assert result["command"] == "run" and result["run_id"] == "r1"
    assert result["outputs"] == {"manifest": "s3://b/m.parquet"}


def test_a_later_write_replaces_the_whole_file(tmp_path: Path) -> None:
    write_result(str(tmp_path), {"command": "curate", "run_id": "a", "outputs": {"manifest": "m1", "x": "y"}})
    write_result(str(tmp_path), {"command": "curate", "run_id": "b", "outputs": {"manifest": "m2"}})
    result = read_result(str(tmp_path))
    assert result is not None and result["run_id"] == "b" and result["outputs"] == {"manifest": "m2"}


def test_missing_and_bad_results(tmp_path: Path) -> None:
    assert read_result(str(tmp_path / "nothing-here")) is None
    (tmp_path / RESULT_NAME).write_text("manifest: m.parquet\n")
    with pytest.raises(ResultError, match="not JSON"):
        read_result(str(tmp_path))
    (tmp_path / RESULT_NAME).write_text(json.dumps({"version": 99, "outputs": {}}))
    with pytest.raises(ResultError, match="version 99"):
        read_result(str(tmp_path))
    with pytest.raises(ValueError, match="run_id"):  # a caller's bug, not a user's
        write_result(str(tmp_path), {"command": "curate", "outputs": {}})


def test_result_in_object_storage(s3_bucket: str) -> None:
    prefix = f"{s3_bucket}/runs/r2"
    write_result(prefix, {"command": "run", "run_id": "r2", "outputs": {"run_dir": prefix}})
    result = read_result(prefix)
    assert result is not None and result["outputs"]["run_dir"] == prefix
