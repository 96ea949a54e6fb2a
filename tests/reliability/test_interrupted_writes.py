"""Interrupted and concurrent writes: a killed run never leaves half a manifest, and two runs writing to one
output never leave a mixed pair (manifest from one, quarantine from the other)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.runs import resolve_run
from pipeline.core.storage import LOCK_NAME, LockHeld, exists, output_lock, url_to_fs
from pipeline.demo_data import DemoSpec, write_demo_data
from stages.manifest import read_table

runner = CliRunner()


def _curate_in_process(input_url: str, output_url: str) -> None:
    result = runner.invoke(app, ["curate", "-i", input_url, "-o", output_url, "--score", "none"])
    assert result.exit_code == 0, result.output


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the child and everything in its session (its own Ray), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _published_pair(out: str) -> tuple[str, pd.DataFrame, dict, pd.DataFrame, dict]:
    """The run `OUT/runs/latest` publishes and its two files, read through the pointer as every reader does."""
    run_dir = resolve_run(out)
    manifest, m_meta = read_table(f"{run_dir}/manifest.parquet")
    quarantine, q_meta = read_table(f"{run_dir}/quarantine.parquet")
    return run_dir, manifest, m_meta, quarantine, q_meta


@pytest.mark.parametrize(
    "moment",
    [
        pytest.param("run-dir", id="writing-its-own-manifest"),  # before the pointer flips
        pytest.param("copy", id="refreshing-the-output-copy"),  # after the pointer flipped
    ],
)
def test_a_kill_at_any_moment_leaves_one_published_pair(
    moment: str, ray_cluster: None, s3_server: str, s3_bucket: str, fault_proxy, tmp_path: Path
) -> None:
    """`maskdiet curate` (its own process, joined to the session's Ray) is SIGKILLed while a manifest PUT is in
    flight, held open by the proxy so the moment is exact: while it writes its own run directory, or while
    it refreshes OUTPUT/manifest.parquet after publishing. Read through `runs/latest`, the output always
    holds one run's manifest and quarantine: the previous run's before the flip, the new run's after; a
    rerun completes and breaks the dead run's lock."""
    data, out = f"{s3_bucket}/images", f"{s3_bucket}/curated"
    write_demo_data(data, DemoSpec(per_class=3, bad=2, seed=4))
    _curate_in_process(data, out)
    before_dir, before, before_meta, _, _ = _published_pair(out)
    write_demo_data(f"{s3_bucket}/images/more", DemoSpec(per_class=2, seed=5))  # the next run has more rows

    def held(method: str, path: str) -> bool:
        path = path.split("?")[0]
        if moment == "run-dir":
            return method == "PUT" and "/curated/runs/" in path and path.endswith("/manifest.parquet")
        return method == "PUT" and path.endswith("/curated/manifest.parquet")

    fault_proxy.policy.stall = held
    env = {**os.environ, "AWS_ENDPOINT_URL": fault_proxy.url}
    address = ray.get_runtime_context().gcs_address
    args = ["curate", "-i", data, "-o", out, "--score", "none", "--set", f"ray.address={address}"]
    log = tmp_path / "child.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            stalled = fault_proxy.policy.stalled.wait(timeout=240)
        finally:
            _kill_tree(proc)
    assert stalled, f"the run never started writing its manifest: {log.read_text()[-2000:]}"
    fault_proxy.policy.release.set()

    run_dir, manifest, m_meta, quarantine, q_meta = _published_pair(out)
    assert m_meta["run_id"] == q_meta["run_id"]  # one run's pair, whatever the moment
    if moment == "run-dir":  # killed before the flip: the previous run is still the published one
        assert run_dir == before_dir and m_meta["run_id"] == before_meta["run_id"]
        pd.testing.assert_frame_equal(manifest, before)
    else:  # killed after the flip: the new run is published whole
        assert run_dir != before_dir and len(manifest) == len(before) + 20 and len(quarantine) == 2
    assert exists(f"{out}/{LOCK_NAME}") == (moment == "copy")  # the lock is held only around publishing
    _curate_in_process(data, out)  # a rerun completes (breaking a dead run's lock: its process is gone)
    rerun_dir, rerun, rerun_meta, quarantine, quarantine_meta = _published_pair(out)
    assert len(rerun) == len(before) + 20 and len(quarantine) == 2
    assert rerun_meta["run_id"] == quarantine_meta["run_id"] != before_meta["run_id"]
    _copy, copy_meta = read_table(f"{out}/manifest.parquet")  # the output's copies follow the pointer
    assert copy_meta["run_id"] == rerun_meta["run_id"] and rerun_dir.endswith(rerun_meta["run_id"])
    assert not exists(f"{out}/{LOCK_NAME}")


WRITER = textwrap.dedent(
    """
    import sys
    from pipeline.core.storage import atomic_write_bytes
    url, size = sys.argv[1], int(sys.argv[2])
    version = 0
    while True:
        version = (version + 1) % 256
        atomic_write_bytes(url, bytes([version]) * size)
        print(version, flush=True)
    """
)


def test_sigkill_mid_write_never_leaves_a_torn_file(tmp_path: Path) -> None:
    """A process rewriting a 16 MB file in a loop is SIGKILLed again and again: the file is always one whole
    version. Kills that land mid-write (a temporary sibling left behind) are counted: some must occur."""
    target = tmp_path / "manifest.parquet"
    size = 16 * 1024 * 1024
    torn_attempts = 0
    for attempt in range(12):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(size)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one version is complete
        time.sleep(0.05 + 0.037 * attempt)
        _kill_tree(proc)
        data = target.read_bytes()
        assert len(data) == size and data.count(data[:1]) == size, "a torn or mixed file"
        leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        torn_attempts += bool(leftovers)
        for p in leftovers:
            p.unlink()
        if torn_attempts >= 2 and attempt >= 5:
            break
    assert torn_attempts >= 1, "no kill landed mid-write; the test proved nothing"


COMMITTER = textwrap.dedent(
    """
    import sys
    import pandas as pd
    from pipeline.core.storage import join, output_lock
    from stages.manifest import write_manifest, write_quarantine
    out, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(rounds):
        run_id = f"{name}-{i}"
        rows = 200 if name == "a" else 300
        frame = pd.DataFrame({"path": [f"{name}/{k}.png" for k in range(rows)], "sha256": "x", "label": 0,
                              "class_name": name, "kept": True, "reason": "kept"})
        bad = pd.DataFrame({"path": [f"{name}/bad.png"], "sha256": "y", "reason": "empty", "error": "e"})
        with output_lock(out, wait=60, poll=0.05):
            write_quarantine(join(out, "quarantine.parquet"), bad, {"run_id": run_id})
            write_manifest(join(out, "manifest.parquet"), frame, {"run_id": run_id})
    """
)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_runs_never_mix_their_files(where: str, tmp_path: Path, s3_bucket: str) -> None:
    """Two processes commit (quarantine, then manifest) to one output over and over; whoever wrote last,
    the pair on disk always comes from one run."""
    out = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    procs = [
        subprocess.Popen([sys.executable, "-c", COMMITTER, out, name, "5"], env=dict(os.environ))
        for name in ("a", "b")
    ]
    checks = 0
    while any(p.poll() is None for p in procs):
        if exists(f"{out}/manifest.parquet"):
            with output_lock(out, wait=60, poll=0.05):  # a reader takes the lock to see a settled pair
                manifest, m_meta = read_table(f"{out}/manifest.parquet")
                quarantine, q_meta = read_table(f"{out}/quarantine.parquet")
            assert m_meta["run_id"] == q_meta["run_id"]
            assert set(manifest["class_name"]) == {m_meta["run_id"][0]}
            assert quarantine["path"].tolist() == [f"{m_meta['run_id'][0]}/bad.png"]
            checks += 1
        time.sleep(0.1)
    assert [p.returncode for p in procs] == [0, 0]
    manifest, m_meta = read_table(f"{out}/manifest.parquet")
    _quarantine, q_meta = read_table(f"{out}/quarantine.parquet")
    assert m_meta["run_id"] == q_meta["run_id"] and m_meta["run_id"].endswith("-4")
    assert len(manifest) == (200 if m_meta["run_id"][0] == "a" else 300)
    assert not exists(f"{out}/{LOCK_NAME}")


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pipeline.core.storage import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_live_lock_refuses_and_a_dead_one_is_broken(where: str, tmp_path: Path, s3_bucket: str) -> None:
    out = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, out], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(LockHeld) as refused, output_lock(out, wait=1.0, poll=0.1):
            pass
        assert time.monotonic() - started >= 1.0
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and LOCK_NAME in message and "\n" not in message
    finally:
        _kill_tree(holder)  # dies holding the lock
    fs, root = url_to_fs(out)
    lock = json.loads(fs.cat_file(f"{root}/{LOCK_NAME}"))
    assert lock["pid"] == holder.pid
    with output_lock(out, wait=5.0):  # the holder is gone: its lock is stale and broken at once
        assert json.loads(fs.cat_file(f"{root}/{LOCK_NAME}"))["pid"] == os.getpid()
    assert not exists(f"{out}/{LOCK_NAME}")


def test_a_lock_older_than_stale_after_is_broken(tmp_path: Path) -> None:
    """A lock from another host cannot be checked for a live process; its age decides."""
    out = tmp_path / "out"
    out.mkdir()
    old = {"owner": "x", "host": "elsewhere", "pid": 1, "time": time.time() - 3600, "since": "an hour ago"}
    (out / LOCK_NAME).write_text(json.dumps(old))
    with pytest.raises(LockHeld, match="elsewhere"), output_lock(str(out), wait=0.2, stale_after=7200):
        pass
    with output_lock(str(out), wait=0.2, stale_after=600):
        pass
    assert not (out / LOCK_NAME).exists()


def test_a_local_lock_appears_with_its_body_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """The lock is named only once its body is written (a reader never sees an empty lock and takes it for a
    stale one); a second creator is refused and leaves nothing behind."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    from pipeline.core import storage
    from pipeline.core.storage import _create_exclusive

    fs, path = LocalFileSystem(), str(tmp_path / "out" / LOCK_NAME)
    real_link, seen = os.link, []

    def link(src: str, dst: str) -> None:
        seen.append(Path(src).read_bytes())  # what the name will point at, the moment before it exists
        real_link(src, dst)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(storage.os, "link", link)
        assert _create_exclusive(fs, path, b'{"pid": 1}')
    assert seen == [b'{"pid": 1}']
    assert oct(Path(path).stat().st_mode & 0o777) == oct(0o644)
    assert not _create_exclusive(fs, path, b'{"pid": 2}')
    assert Path(path).read_bytes() == b'{"pid": 1}'
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK_NAME]
