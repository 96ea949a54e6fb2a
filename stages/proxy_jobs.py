"""Proxy training as Ray Train jobs (`score.trainer=train`): proxies that survive a dead worker.

A proxy trained as a plain Ray task (`stages.score.train_proxies`, the default) is lost with its task and
trained again from scratch. At scale a proxy is an hour of GPU time (a ResNet-18 over a million images), so
here each of the K proxies is its own Ray Train job instead:

    K jobs at once → each: one worker (score.cpus_per_model CPUs, score.gpus_per_model of a GPU)
                     → train_proxy, reading the pixels window by window from the object store
                     → after every epoch: a checkpoint of where training stands (`ProxyTraining`)
                     → at the end: a checkpoint of the trained proxy (`ProxyResult`)

`FailureConfig(score.max_failures)` restarts a dead worker from its last epoch, and the training goes on as
if it had not stopped (same weights at the end on CPU: the data order, momentum and forgetting counts are in
the checkpoint). The jobs keep their checkpoints in the score cache's folder for the scoring key, named
after the rows they train on, so a curation that was killed resumes its unfinished proxies when rerun over
the same images (a finished one hands back its result at once).

Each job's blocking `fit()` runs in a Ray task of no CPU, so the driver waits on K results as it does for
the task path.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch

from pipeline.core.storage import ray_storage
from pipeline.models.proxy import ProxyResult, ProxySpec, ProxyTraining, RowWindows, train_proxy

log = logging.getLogger(__name__)

STATE_NAME = "proxy.pt"  # in each checkpoint: a ProxyTraining (mid-training) or a ProxyResult (done)


@dataclass(frozen=True)
class ProxyJobs:
    """Where and how the proxy jobs of one scoring run keep their checkpoints."""

    storage: str  # URL of the folder holding one Ray Train run per proxy
    rows: str  # digest of the rows trained on (sha256 and label): a rerun over the same rows resumes
    max_failures: int  # worker restarts per proxy
    state_api: bool  # whether the cluster has the State API (see `pipeline.core.trainer.Trainer`)
    storage_options: dict[str, Any] | None = None

    def run_name(self, spec: ProxySpec, seed: int) -> str:
        return f"proxy-{spec.task}-{self.rows}-s{seed}"


def rows_digest(keys: pd.DataFrame) -> str:
    """A short digest of the (sha256, label) rows, in order: the same images under the same labels give the
    same digest, so their proxy jobs are the same runs."""
    hashed = pd.util.hash_pandas_object(keys.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- worker


def _report(state: ProxyTraining | ProxyResult, metrics: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_NAME)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def proxy_loop(loop_config: dict[str, Any]) -> None:
    """One proxy's Train worker: resume from the latest checkpoint when there is one, train the remaining
    epochs with a checkpoint after each, and report the trained proxy as the last checkpoint."""
    spec: ProxySpec = loop_config["spec"]
    seed: int = loop_config["seed"]
    saved = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_NAME, map_location="cpu", weights_only=False)
    if isinstance(saved, ProxyResult):  # finished by an earlier run: hand the result back again
        _report(saved, {"epoch": spec.epochs, "done": True})
        return
    if saved is not None:
        log.info("proxy seed %d resumes after epoch %d", seed, saved.epoch)

    def checkpoint_epoch(state: ProxyTraining) -> None:
        _report(state, {"epoch": state.epoch, "loss": state.losses[-1], "done": False})

    windows: RowWindows = loop_config["windows"]
    labels = np.asarray(ray.get(loop_config["labels"]), dtype=np.int64)
    result = train_proxy(windows, labels, spec, seed, resume=saved, on_epoch=checkpoint_epoch)
    _report(result, {"epoch": spec.epochs, "loss": result.losses[-1], "done": True})


# ---------------------------------------------------------------------------------------------- driver


def fit_proxy_job(
    windows: RowWindows,
    labels: list[ray.ObjectRef],
    spec: ProxySpec,
    seed: int,
    resources: dict[str, float],
    jobs: ProxyJobs,
) -> ProxyResult:
    """Run (or resume) one proxy's Train job to the end and return the trained proxy (run in a Ray task).
    `labels` is `[ref]`: inside a list a reference reaches the task unresolved, and the worker reads it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from pipeline.core.trainer import Trainer

    storage_path, storage_fs = ray_storage(jobs.storage, jobs.storage_options)
    trainer = Trainer(
        proxy_loop,
        state_api=jobs.state_api,
        train_loop_config={"windows": windows, "labels": labels[0], "spec": spec, "seed": seed},
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=spec.device == "cuda", resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=jobs.run_name(spec, seed),
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest is all a restart needs
            failure_config=FailureConfig(max_failures=jobs.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"proxy job {jobs.run_name(spec, seed)} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        trained = torch.load(Path(d) / STATE_NAME, map_location="cpu", weights_only=False)
    if not isinstance(trained, ProxyResult):
        raise RuntimeError(f"proxy job {jobs.run_name(spec, seed)} ended before its last epoch")
    return trained


def submit_proxy_jobs(
    windows: RowWindows,
    labels_ref: ray.ObjectRef,
    spec: ProxySpec,
    seeds: list[int],
    resources: dict[str, float],
    jobs: ProxyJobs,
) -> list[ray.ObjectRef]:
    """Start one proxy job per seed, all at once; each reference resolves to its `ProxyResult`."""
    fit = ray.remote(num_cpus=0)(fit_proxy_job)
    return [fit.remote(windows, [labels_ref], spec, seed, resources, jobs) for seed in seeds]
