"""Curation, composed: list → read → decode → gather → (score → duplicates | unscored) → prune → manifest.

The input is a folder, WebDataset shards or Parquet tables (`data.format`, `stages/formats.py`): the listing
and the first stage differ (`ReadBytes` per object, `ReadShards` per shard, `ReadRowGroups` per row group),
everything after decode is the same. Shards and tables carry their labels, so their classes are known once
every row is read (`stages.formats.finish_labels`): the row stages are built again with them then.

`curation_stages` builds the chain one run composes and checks it before any work starts (a stage that
needs a column no earlier stage makes fails there, not in the middle of the run). Read and decode are map
stages that stream through Ray Data in parallel; the driver then gathers the decodable rows' metadata and
runs the all-to-all stages over all of them at once. When a score is asked for, the decoded pixels the
proxies train on never gather there: each batch goes to the object store as it streams past, once, and is
read through a chunk layout over the rows (`stages.pixels.PixelStore`); the driver holds their references,
and those of the near-duplicate thumbnails stored beside them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import Config, PruneConfig
from pipeline.core.errors import UserInputError
from pipeline.core.runs import publish, run_dir_for
from pipeline.core.storage import atomic_write_bytes, join, output_lock, read_bytes
from stages.base import Batch, ChainStages, Progress, Stage, check_chain, run_on_driver
from stages.decode import GOOD_COLUMNS, DecodeOptions, DecodeStage, GatherDecoded
from stages.embed import Device, DuplicateGroups
from stages.export import ExportResult, export_kept
from stages.formats import UNIT_COLUMNS, ContainerListing, finish_labels
from stages.manifest import MANIFEST_NAME, QUARANTINE_NAME, ManifestStage, manifest_frame, write_quarantine
from stages.pixels import PixelChunks, PixelStore
from stages.prune import PruneStage, policy_for
from stages.read import (
    LISTING_COLUMNS,
    ImageListing,
    ReadBytes,
    container_reader,
    list_source,
    read_chain,
    read_containers,
)
from stages.score import ScoreStage, Unscored

log = logging.getLogger(__name__)


class NothingDecoded(UserInputError):
    """Every listed object was quarantined: there is nothing to score, prune or train on."""


@dataclass
class Decoded:
    """The decoded input: metadata rows for good images, their pixels (optional), and the quarantine."""

    frame: pd.DataFrame  # path, sha256, label, class_name — one row per decodable image, sorted by path
    quarantine: pd.DataFrame  # path, sha256, reason, error
    classes: list[str] = field(default_factory=list)
    pixels: Batch = field(default_factory=dict)  # `PixelStore`'s columns (pixels, thumbnail), when kept

    @property
    def total(self) -> int:
        """Every row read: decodable or quarantined."""
        return len(self.frame) + len(self.quarantine)

    @property
    def images(self) -> PixelChunks | None:
        """The decoded images in `frame` order, in the object store, when kept."""
        return self.pixels.get("pixels")

    def batch(self) -> Batch:
        """The good rows as one batch (every row) for the driver's stages; `pixels` and `thumbnail` when
        kept."""
        return {**{name: self.frame[name].to_numpy() for name in GOOD_COLUMNS}, **self.pixels}


@dataclass
class CurateResult:
    run_id: str
    run_dir: str  # the run's own directory (OUTPUT/runs/<run_id> on its own)
    manifest_url: str
    quarantine_url: str
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    seconds: float
    counts: dict[str, int]
    format: str = "folder"  # folder | webdataset | parquet: what the input held
    export: ExportResult | None = None  # the kept images as shards (`export.format`), in RUN_DIR/export/

    @property
    def images_per_second(self) -> float:
        total = len(self.manifest) + len(self.quarantine)
        return total / self.seconds if self.seconds > 0 else 0.0


Source = ImageListing | ContainerListing  # a folder's images, or the read units of shards or tables


@dataclass(frozen=True)
class Ingest:
    """Read → decode, one fused Ray Data map stage, then the driver's gather of the decodable rows (and,
    with `store`, the pixels kept in the object store). `columns` are what the source hands the first stage
    (a listing's rows, or read units)."""

    read_decode: ChainStages
    gather: GatherDecoded
    columns: tuple[str, ...] = LISTING_COLUMNS
    store: PixelStore | None = None

    @classmethod
    def build(cls, config: Config, keep_images: bool, source: Source | None = None) -> Ingest:
        decode = DecodeStage(DecodeOptions.from_config(config.decode))
        store = PixelStore(config.decode.image_size, config.score.chunk_rows) if keep_images else None
        if isinstance(source, ContainerListing):
            reader = container_reader(source, config.data)
            return cls(ChainStages(reader, decode), GatherDecoded(), UNIT_COLUMNS, store)
        return cls(ChainStages(ReadBytes.for_data(config.data), decode), GatherDecoded(), store=store)

    def stages(self) -> list[Stage]:
        return [self.read_decode, self.gather, *([self.store] if self.store else [])]  # store: fed on the way


@dataclass(frozen=True)
class CurationPlan:
    """The stages one curation composes, in order: `ingest`, then `rows` over every decodable row on the
    driver, then the `manifest` sink."""

    ingest: Ingest
    rows: list[Stage]  # score + duplicates, or unscored; then prune
    manifest: ManifestStage
    score: ScoreStage | None = None  # the score stage among `rows`, whose outcome says what it cost

    def stages(self) -> list[Stage]:
        return [*self.ingest.stages(), *self.rows, self.manifest]


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def prune_config(config: Config) -> PruneConfig:
    """`prune`, except that with no score a policy that needs one keeps everything instead (random does not
    need one)."""
    if config.score.method != "none" or not policy_for(config.prune.policy).needs_score:
        return config.prune
    log.info(
        "score.method=none: prune.policy=%s needs scores, so every image is kept "
        "(prune.policy=random prunes without them)",
        config.prune.policy,
    )
    return config.prune.model_copy(update={"policy": "none"})


def curation_stages(
    config: Config,
    classes: list[str],
    manifest_url: str,
    metadata: dict[str, Any],
    progress: Progress | None = None,
    source: Source | None = None,
) -> CurationPlan:
    """The chain this run composes for `source` (None: a folder listing), checked against the source's
    columns before anything runs."""
    scoring = config.score.method != "none"
    score = ScoreStage(config, classes, progress) if scoring else None
    duplicates = DuplicateGroups(config.score.duplicate_threshold, Device(config.score.gpu_share))
    rows: list[Stage] = [score, duplicates] if score else [Unscored()]
    rows.append(PruneStage(prune_config(config)))
    manifest = ManifestStage(manifest_url, metadata, config.data.storage_options)
    plan = CurationPlan(Ingest.build(config, keep_images=scoring, source=source), rows, manifest, score)
    check_chain(plan.stages(), plan.ingest.columns)
    return plan


def decode_listing(
    listing: Source, config: Config, keep_images: bool, progress: Progress | None = None
) -> Decoded:
    """Read and decode every listed object (or every sample of the listed shards or tables) with Ray Data;
    returns good rows (and their pixels, in the object store) and quarantine rows."""
    return decode_with(listing, config, Ingest.build(config, keep_images, listing), progress)


def _no_rows(names: tuple[str, ...]) -> Batch:
    empty: Batch = {name: np.asarray([], dtype=object) for name in names}
    empty.update(ok=np.zeros(0, dtype=bool), label=np.zeros(0, dtype=np.int64))
    return empty


def decode_with(listing: Source, config: Config, ingest: Ingest, progress: Progress | None = None) -> Decoded:
    """`decode_listing` with the ingest stages given (a plan's, already checked)."""
    check_chain(ingest.stages(), ingest.columns)
    parts: list[Batch] = []
    done = 0
    if isinstance(listing, ContainerListing):
        dataset = read_containers(listing, config.data, ingest.read_decode)
        total = listing.expected_rows  # None for shards: their samples are counted as they are read
    else:
        dataset = read_chain(listing, config.data, ingest.read_decode)
        total = len(listing)
    batches = dataset.iter_batches(
        batch_size=config.data.read_batch_size, batch_format="numpy", prefetch_batches=4
    )
    for batch in batches:
        parts.append({name: batch[name] for name in ingest.gather.inputs})  # no bytes, no pixels
        if ingest.store:
            ingest.store.add(batch)  # into the object store now: the driver holds one batch at a time
        done += len(batch["path"])
        if progress:
            progress("decode", done, max(total or 0, done))
    # Every listed object comes back as a row (good or not); shards may hold no samples at all.
    if parts:
        every = {name: np.concatenate([p[name] for p in parts]) for name in ingest.gather.inputs}
    else:
        every = _no_rows(ingest.gather.inputs)
    good = ingest.gather(every)
    frame = pd.DataFrame({name: good[name] for name in GOOD_COLUMNS})
    classes = listing.classes
    if isinstance(listing, ContainerListing):
        frame, classes = finish_labels(frame, config.data)
    pixels = ingest.store.finish(frame["path"].tolist()) if ingest.store else {}  # rows in frame order
    return Decoded(frame, ingest.gather.quarantine(every), classes, pixels)


def publish_curation(output: str, run_dir: str, storage_options: dict[str, Any]) -> tuple[str, str]:
    """Publish a curation's run directory and refresh the output's copies of its pair; returns the copies'
    URLs. Under the output's lock, so the pointer and the copies name the same run when two curations share
    an output (each file is written atomically; a kill between the copies leaves the pointer right)."""
    manifest_copy, quarantine_copy = join(output, MANIFEST_NAME), join(output, QUARANTINE_NAME)
    with output_lock(output, storage_options):
        publish(output, run_dir, storage_options)
        for name, copy in ((QUARANTINE_NAME, quarantine_copy), (MANIFEST_NAME, manifest_copy)):
            atomic_write_bytes(copy, read_bytes(join(run_dir, name), storage_options), storage_options)
    return manifest_copy, quarantine_copy


def curate(config: Config, progress: Progress | None = None, run_dir: str | None = None) -> CurateResult:
    """Run curation per `config` into its own run directory, then publish it.

    On its own (`run_dir` None) curation writes `OUTPUT/runs/<run_id>/{manifest,quarantine}.parquet`, flips
    `OUTPUT/runs/latest` to that directory (the one atomic step that publishes the pair), and then refreshes
    the copies at `OUTPUT/manifest.parquet` and `OUTPUT/quarantine.parquet` that the command line names,
    under the output's lock so that two curations never leave the copies from different runs. A reader that
    needs the two files as a pair goes through the pointer (`pipeline.core.runs.resolve_run`); a kill before
    the flip leaves the previous run published. Inside `maskdiet run` (`run_dir` given) the pair is written
    there and the run publishes itself when it ends. With `export.format` set, the kept images are written as
    shards into RUN_DIR/export/ (`stages.export`) before the run is published, so they publish with it.
    """
    start = time.perf_counter()
    run_id = config.run_id or new_run_id()
    standalone = run_dir is None
    run_dir = run_dir or run_dir_for(config.output, run_id)
    listing = list_source(config.data)
    if isinstance(listing, ContainerListing):
        fmt = listing.format
        log.info(
            "listed %d %s (%d read tasks) at %s",
            listing.containers,
            "shards" if fmt == "webdataset" else "tables",
            len(listing),
            config.data.input,
        )
    else:
        fmt = "folder"
        log.info(
            "listed %d objects in %d classes under %s", len(listing), len(listing.classes), config.data.input
        )
    if progress:
        progress("list", len(listing), len(listing))
    metadata = {"run_id": run_id, "config": config.redacted(), "classes": listing.classes, "format": fmt}
    manifest_url = join(run_dir, MANIFEST_NAME)
    quarantine_url = join(run_dir, QUARANTINE_NAME)
    plan = curation_stages(config, listing.classes, manifest_url, metadata, progress, listing)

    decoded = decode_with(listing, config, plan.ingest, progress)
    if decoded.classes != listing.classes:  # shards and tables: classes known once every row is read
        metadata["classes"] = decoded.classes
        plan = curation_stages(config, decoded.classes, manifest_url, metadata, progress, listing)
    # With no decodable image there is nothing to score or prune: the manifest is written empty.
    rows = run_on_driver(plan.rows, decoded.batch()) if len(decoded.frame) else decoded.batch()
    so = config.data.storage_options
    write_quarantine(quarantine_url, decoded.quarantine, metadata, so)
    plan.manifest(rows)
    exported = None
    if config.export.format != "none" and len(decoded.frame):  # in the run dir, published with it
        exported = export_kept(manifest_frame(rows), join(run_dir, "export"), config.export, config.data)
    if standalone:
        manifest_url, quarantine_url = publish_curation(config.output, run_dir, so)
    if decoded.total == 0:  # shards or tables holding no samples at all
        raise NothingDecoded(f"no samples found in the {fmt} input at {config.data.input}")
    if decoded.frame.empty:  # both files are written (one run's pair); the quarantine says why each failed
        reasons = ", ".join(f"{r} {n}" for r, n in Counter(decoded.quarantine["reason"]).most_common())
        raise NothingDecoded(
            f"none of the {decoded.total} objects under {config.data.input} decoded ({reasons}); "
            f"each file's reason is in {quarantine_url}"
        )
    frame = manifest_frame(rows)
    counts = Counter(frame["reason"].tolist()) + Counter(
        f"quarantine:{r}" for r in decoded.quarantine["reason"]
    )
    if plan.score is not None and plan.score.outcome is not None:
        outcome = plan.score.outcome  # scored = cache misses scored this run, cached = cache hits
        counts.update({"scored": outcome.scored, "cached": outcome.cached})
    seconds = time.perf_counter() - start
    log.info("curated %d objects in %.1f s", decoded.total, seconds)
    return CurateResult(
        run_id=run_id,
        run_dir=run_dir,
        manifest_url=manifest_url,
        quarantine_url=quarantine_url,
        manifest=frame,
        quarantine=decoded.quarantine,
        seconds=seconds,
        counts=dict(counts),
        format=fmt,
        export=exported,
    )
