"""Run directories and the one pointer that publishes them.

Every run (`maskdiet run`, and `maskdiet curate` on its own) writes everything it makes into its own
directory, `<output>/runs/<run_id>/`, that no other run writes to. It becomes the published run only when
`<output>/runs/latest` (one small object holding the run directory's URL) is replaced, which is atomic on a
local disk and on object stores alike. So a reader that goes through the pointer sees one run's files
together (never a manifest from one run beside a quarantine from another), and a run killed at any moment
leaves the previously published run as it was: its own directory is simply never pointed to.

`resolve_run` is how readers find a run: a run directory as it is, or an output folder through its pointer.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.errors import UserInputError
from pipeline.core.storage import absolute_url, atomic_write_bytes, exists, join, read_bytes

RUNS = "runs"
LATEST = "latest"
# The files of a run directory (the manifest's and quarantine's names are the manifest stage's own)
CONFIG_NAME = "config.yaml"  # the resolved config, secrets redacted
ENCODER_NAME = "encoder.pth"  # the pretrained encoder, timm ViT keys
METRICS_NAME = "metrics.jsonl"  # one JSON line per reported training step
EVALUATION_NAME = "evaluation.json"
SUMMARY_NAME = "summary.json"
# Beside demo images (not in a run): the true labels of a folder with injected label noise
TRUTH_NAME = "_truth.parquet"


def run_dir_for(output: str, run_id: str) -> str:
    """`<output>/runs/<run_id>`: the directory a run writes into and nobody else does."""
    return join(output, RUNS, run_id)


def latest_pointer(output: str) -> str:
    return join(output, RUNS, LATEST)


def publish(output: str, run_dir: str, storage_options: dict[str, Any] | None = None) -> None:
    """Make `run_dir` the output's published run: one atomic write of the pointer."""
    atomic_write_bytes(latest_pointer(output), run_dir.encode(), storage_options)


def published_run(output: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The run directory `<output>/runs/latest` names, or None when nothing was published there yet."""
    pointer = latest_pointer(output)
    if not exists(pointer, storage_options):
        return None
    return read_bytes(pointer, storage_options).decode().strip()


def run_location(url: str) -> str:
    """A run directory's URL as given, normalised: no trailing slash on object stores, local paths absolute
    (Train workers, which load a run's encoder, run in other folders)."""
    return url.rstrip("/") if "://" in url else absolute_url(url)


def resolve_run(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The run directory a user means: an output folder with a published run gives that run; anything else
    is taken as a run directory itself (made absolute when local)."""
    url = run_location(url)
    published = published_run(url, storage_options)
    if published:
        return published
    if not exists(url, storage_options):
        raise UserInputError(f"no run directory at {url} (give OUTPUT/runs/<run_id> or an output folder)")
    return url
