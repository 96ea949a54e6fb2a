"""Run directories and the `runs/latest` pointer that publishes one (pipeline/core/runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.errors import MaskdietError
from pipeline.core.runs import publish, published_run, resolve_run, run_dir_for


def test_nothing_is_published_until_the_pointer_is_written(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    first, second = run_dir_for(out, "r1"), run_dir_for(out, "r2")
    assert first == f"{out}/runs/r1" and published_run(out) is None
    Path(first).mkdir(parents=True)
    publish(out, first)
    Path(second).mkdir(parents=True)  # a second run is writing: readers still see the first
    assert published_run(out) == first and resolve_run(out) == first
    publish(out, second)
    assert resolve_run(out) == second


def test_a_run_directory_resolves_to_itself_and_a_missing_one_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "out" / "runs" / "r1"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_run("out/runs/r1/") == str(run)  # relative paths made absolute
    with pytest.raises(MaskdietError, match="no run directory at"):
        resolve_run(str(tmp_path / "nowhere"))


def test_the_pointer_works_on_s3(s3_bucket: str) -> None:
    out = f"{s3_bucket}/out"
    publish(out, run_dir_for(out, "r9"))
    assert resolve_run(out) == f"{out}/runs/r9"
