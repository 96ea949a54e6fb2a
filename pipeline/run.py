"""The whole pipeline in one function: curate → pretrain → evaluate → report, into one run directory.

    <output>/runs/<run_id>/
        config.yaml          the resolved config (secrets redacted)
        manifest.parquet     what was kept and why;  quarantine.parquet: what could not be decoded
        checkpoints/         Ray Train checkpoints (rerunning the same run_id resumes from the latest)
        encoder.pth          the pretrained encoder, timm ViT keys
        metrics.jsonl        one JSON line per reported training step
        evaluation.json      kNN / linear-probe / fine-tune accuracy: pretrained, random init, raw pixels
        summary.json         the numbers printed at the end
        report/              PNG plots, index.html, summary.md
    <output>/runs/latest     the URL of the newest finished run (for `--previous latest`)
    <output>/score_cache/    scores by (content hash, scoring config): reruns score only new images

Everything is written per stage and idempotently, so an interrupted run (Ctrl-C, a dead node) is resumed by
running the same command with `--set run_id=<id>`: curation reuses the score cache, training resumes from
its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from pipeline.core.config import Config, dump_config
from pipeline.core.runs import (
    CONFIG_NAME,
    ENCODER_NAME,
    EVALUATION_NAME,
    LATEST,
    SUMMARY_NAME,
    TRUTH_NAME,
    publish,
    published_run,
    run_dir_for,
    run_location,
)
from pipeline.core.storage import atomic_write_bytes, exists, join, read_bytes
from pipeline.curate import CurateResult, Progress, curate, new_run_id
from pipeline.tracking import Tracker, tracked

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: str
    curate: CurateResult
    summary: dict[str, Any] = field(default_factory=dict)
    report_url: str | None = None


def resolve_previous(output: str, previous: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """`latest` → the run dir published in `<output>/runs/latest` (None when there is none); else as given,
    a relative local path made absolute (Train workers, which load its encoder, run in other folders)."""
    if previous != LATEST:
        return run_location(previous)
    return published_run(output, storage_options)


def score_cache_url(config: Config, previous_dir: str | None) -> str:
    """Where this run's scores are cached: `score.cache_url` if set; else the previous run's cache (from
    its saved config.yaml), so `--previous` reuses its scores even from another output; else
    `<output>/score_cache`."""
    if config.score.cache_url:
        return config.score.cache_url
    so = config.data.storage_options
    if previous_dir and exists(join(previous_dir, CONFIG_NAME), so):
        saved = yaml.safe_load(read_bytes(join(previous_dir, CONFIG_NAME), so)) or {}
        url = str((saved.get("score") or {}).get("cache_url") or "")
        if url and url == join(str(saved.get("output", "")), "score_cache") and "/runs/" in previous_dir:
            # the default place, <output>/score_cache: beside the run's own runs/ folder, wherever it is
            # now (a relative output was relative to that run's working folder)
            return join(previous_dir.rsplit("/runs/", 1)[0], "score_cache")
        if url and ("://" in url or url.startswith("/")):
            return url
    return join(config.output, "score_cache")


def noise_caught(
    manifest: pd.DataFrame, input_url: str, storage_options: dict[str, Any] | None
) -> dict[str, int]:
    """When the input carries demo truth (`_truth.parquet`), how many injected wrong labels were pruned."""
    truth_url = join(input_url, TRUTH_NAME)
    try:
        if not exists(truth_url, storage_options):
            return {}
        truth = pd.read_parquet(pd.io.common.BytesIO(read_bytes(truth_url, storage_options)))
    except Exception:  # a user's folder may hold an unrelated file of that name
        return {}
    noisy = set(truth.loc[truth["noisy"], "path"])
    pruned = set(manifest.loc[~manifest["kept"], "path"])
    return {"noisy_total": len(noisy), "noisy_pruned": len(noisy & pruned)}


def run_pipeline(
    config: Config,
    previous: str | None = None,
    progress: Progress | None = None,
    stages: tuple[str, ...] = ("curate", "pretrain", "evaluate", "report"),
) -> RunResult:
    """Run the whole pipeline per `config`; see the module docstring for what lands where."""
    start = time.perf_counter()
    so = config.data.storage_options
    run_id = config.run_id or new_run_id()
    run_dir = run_dir_for(config.output, run_id)
    previous_dir = resolve_previous(config.output, previous, so) if previous else None
    updates: dict[str, Any] = {
        "run_id": run_id,
        "score": config.score.model_copy(update={"cache_url": score_cache_url(config, previous_dir)}),
    }
    if previous_dir and config.pretrain.warm_start is None and exists(join(previous_dir, ENCODER_NAME), so):
        updates["pretrain"] = config.pretrain.model_copy(
            update={"warm_start": join(previous_dir, ENCODER_NAME)}
        )
    config = config.model_copy(update=updates)
    atomic_write_bytes(join(run_dir, CONFIG_NAME), dump_config(config).encode(), so)
    log.info("run %s → %s", run_id, run_dir)
    with tracked(config.tracking, run_id, key=run_dir, storage_options=so) as tracker:
        tracker.log_config(config)
        return _run_stages(config, run_dir, previous_dir, progress, stages, tracker, start)


def _run_stages(
    config: Config,
    run_dir: str,
    previous_dir: str | None,
    progress: Progress | None,
    stages: tuple[str, ...],
    tracker: Tracker,
    start: float,
) -> RunResult:
    """curate → pretrain → evaluate → report into `run_dir`, then publish it; logged to `tracker`."""
    so = config.data.storage_options
    run_id = str(config.run_id)
    curated = curate(config, progress=progress, run_dir=run_dir)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "run_dir": run_dir,
        "images_read": len(curated.manifest) + len(curated.quarantine),
        "quarantined": len(curated.quarantine),
        "kept": int(curated.manifest["kept"].sum()),
        "pruned": int((~curated.manifest["kept"]).sum()),
        "scored": curated.counts.get("scored", 0),
        "cached": curated.counts.get("cached", 0),
        "curate_images_per_s": round(curated.images_per_second, 1),
        **noise_caught(curated.manifest, config.data.input, so),
    }
    if previous_dir:
        summary["previous_run"] = previous_dir
        prev = pd.read_parquet(pd.io.common.BytesIO(read_bytes(join(previous_dir, "manifest.parquet"), so)))
        summary["new_images"] = int((~curated.manifest["path"].isin(prev["path"])).sum())

    if "pretrain" in stages:
        from pipeline.train import pretrain

        trained = pretrain(
            config,
            curated.manifest_url,
            run_dir,
            run_name=f"pretrain-{run_id}",
            progress=progress,
            on_metrics=tracker.log_metrics,
        )
        summary.update(
            steps=trained.steps,
            first_loss=trained.first_loss,
            final_loss=trained.final_loss,
            train_images_per_s=trained.images_per_s,
        )
        if "evaluate" in stages:
            from pipeline.evaluate import evaluate_encoder

            # kNN / linear probe / fine-tune on labeled images (evaluate.data, else the input, with its demo
            # truth when it has one), next to a random init and the raw pixels
            data = config.evaluate.data or config.data.input
            if not config.evaluate.data and curated.format != "folder":
                data = curated.manifest_url  # shards / tables: their samples, by manifest path and label
            evaluation = evaluate_encoder(join(run_dir, ENCODER_NAME), data, config).as_dict()
            atomic_write_bytes(join(run_dir, EVALUATION_NAME), json.dumps(evaluation, indent=2).encode(), so)
            summary.update({k: v for k, v in evaluation.items() if isinstance(v, int | float)})
    summary["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_bytes(join(run_dir, SUMMARY_NAME), json.dumps(summary, indent=2).encode(), so)
    report_url = None
    if "report" in stages:
        from pipeline.report import write_report

        report_url = write_report(run_dir, so)
        summary["report"] = join(report_url, "index.html")
    tracker.log_summary(summary)
    tracker.log_files(run_dir, so)
    publish(config.output, run_dir, so)  # the one write that makes this run the latest
    return RunResult(run_dir=run_dir, curate=curated, summary=summary, report_url=report_url)
