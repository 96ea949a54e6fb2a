"""Training faults: a Ray Train worker process SIGKILLed mid-run is restarted (FailureConfig) and resumes
from the latest checkpoint: the run ends at the configured step, no step is logged twice, and the loss
carries on from where it was instead of starting over."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.core.config import load_config
from pipeline.core.storage import join, url_to_fs
from pipeline.demo_data import DemoSpec, write_demo_data
from stages.manifest import write_manifest
from stages.read import list_images

# Enough steps that the kill lands mid-run: on an idle 2-core box this micro model trains ~40 steps a second.
STEPS, CHECKPOINT_EVERY = 300, 20


def _train_worker_pids() -> list[int]:
    """PIDs of this session's Ray Train workers: children of *our* raylet whose title says RayTrainWorker
    (other Ray instances on the machine are left alone). Found with psutil, not the State API, which
    times out on an overloaded box."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    (raylet,) = node.all_processes["raylet"]
    pids = []
    for proc in psutil.Process(raylet.process.pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


@pytest.mark.slow
def test_killed_train_worker_resumes_from_checkpoint(ray_cluster: None, tmp_path: Path) -> None:
    from pipeline.core.storage import read_json_lines
    from pipeline.train import pretrain

    images, output = str(tmp_path / "images"), str(tmp_path / "pretrain")
    write_demo_data(images, DemoSpec(per_class=6, seed=8))
    config = load_config(
        overrides=[
            f"data.input={images}",
            f"output={output}",
            "pretrain.model=mae_vit_micro_patch4",
            f"pretrain.steps={STEPS}",
            "pretrain.batch_size=16",
            "pretrain.num_workers=1",
            "pretrain.cpus_per_worker=0.5",
            "pretrain.base_lr=0.005",
            "pretrain.warmup_steps=5",
            "pretrain.log_every=8",  # not a divisor of the report interval: reports still get fresh lines
            f"pretrain.eval_every={CHECKPOINT_EVERY}",
            f"pretrain.checkpoint_every={CHECKPOINT_EVERY}",
            "pretrain.max_failures=2",
            "pretrain.val_images=8",
            "data.read_batch_size=16",
        ]
    )
    frame = list_images(config.data).frame()
    frame["sha256"], frame["kept"], frame["reason"] = "", True, "kept"
    manifest = join(str(tmp_path), "manifest.parquet")
    write_manifest(manifest, frame, {"run_id": "train-faults"})

    outcome: dict[str, object] = {}

    def fit() -> None:
        try:
            outcome["result"] = pretrain(config, manifest, output, run_name="faulty")
        except BaseException as e:  # reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    metrics_url = join(output, "metrics.jsonl")
    fs, _ = url_to_fs(output)
    snapshot = join(output, "checkpoints", "faulty", "checkpoint_manager_snapshot.json")
    killed_at, deadline = None, time.monotonic() + 400
    while time.monotonic() < deadline and thread.is_alive():
        lines = read_json_lines(metrics_url)
        # metrics.jsonl is written just before each report; a line at step 2×CHECKPOINT_EVERY means the
        # loop went past the first checkpoint's report. Ray Train's controller registers a reported
        # checkpoint a little later (then writes its snapshot): kill only after that, or the restart
        # rightly finds no checkpoint and starts from zero.
        if lines and lines[-1]["step"] >= 2 * CHECKPOINT_EVERY and fs.exists(snapshot):
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed_at = lines[-1]["step"]
                break
        time.sleep(0.5)
    assert killed_at is not None and killed_at < STEPS, "the worker was never killed mid-run"
    thread.join(timeout=500)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in outcome, repr(outcome.get("error"))
    result = outcome["result"]

    assert result.steps == STEPS
    steps = [h["step"] for h in result.history]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # nothing logged twice, ends where configured
    # every report step has its own line, with the numbers of that step's interval and its val_loss
    reported = [h for h in result.history if h["step"] % CHECKPOINT_EVERY == 0]
    assert [h["step"] for h in reported] == list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
    assert all("val_loss" in h and "loss" in h for h in reported), reported
    resumed = [h for h in result.history if "resumed_from" in h]
    assert len(resumed) == 1, result.history
    start = resumed[0]["resumed_from"]
    assert start >= CHECKPOINT_EVERY and start % CHECKPOINT_EVERY == 0 and start <= killed_at
    # the loss carries on: the first interval after the restart is well below the run's first interval and
    # close to the last one before the checkpoint it resumed from
    before = next(h for h in result.history if h["step"] == start)
    assert resumed[0]["loss"] < 0.9 * result.history[0]["loss"]
    assert resumed[0]["loss"] < 1.3 * before["loss"]


@pytest.mark.slow
def test_killed_proxy_job_resumes_from_its_last_epoch(ray_cluster: None, tmp_path: Path) -> None:
    """A proxy trained as a Ray Train job (`score.trainer=train`) whose worker is SIGKILLed after an epoch's
    checkpoint goes on from that epoch, and ends with exactly the proxy an uninterrupted task trains."""
    import numpy as np
    import torch

    from pipeline.core.config import ScoreConfig
    from pipeline.models.proxy import ProxySpec
    from stages.pixels import PixelChunks
    from stages.proxy_jobs import ProxyJobs
    from stages.score import train_proxies

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(6000, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=6000)
    config = ScoreConfig(epochs=6, chunk_rows=500, window_chunks=4)
    spec = ProxySpec.from_config(config, 4, image_size=16)
    pixels = PixelChunks.from_array(images, config.chunk_rows)
    jobs = ProxyJobs(storage=str(tmp_path / "jobs"), rows="faults", max_failures=2, state_api=True)

    outcome: dict[str, object] = {}

    def fit() -> None:
        try:
            outcome["result"] = train_proxies(pixels, labels, spec, [7], config, jobs=jobs)
        except BaseException as e:  # reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    snapshot = tmp_path / "jobs" / jobs.run_name(spec, 7) / "checkpoint_manager_snapshot.json"
    killed, deadline = False, time.monotonic() + 300
    while time.monotonic() < deadline and thread.is_alive():
        if snapshot.exists():  # the controller registered an epoch's checkpoint: a restart finds it
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    assert killed, "the proxy's worker was never killed mid-run"
    thread.join(timeout=300)
    assert not thread.is_alive(), "the proxy job did not finish after its worker was killed"
    assert "error" not in outcome, repr(outcome.get("error"))
    (resumed,) = outcome["result"]
    assert 1 <= resumed.resumed_from < config.epochs  # went on from a checkpoint, not from scratch

    (straight,) = train_proxies(pixels, labels, spec, [7], config)  # as a task, never stopped
    assert resumed.losses == straight.losses
    np.testing.assert_array_equal(resumed.forgetting, straight.forgetting)
    for name, value in straight.state.items():
        assert torch.equal(resumed.state[name], value), name
