"""Curation, composed: list → read → decode → (score → prune) → manifest + quarantine.

Read and decode stream through Ray Data in parallel; the driver keeps only the per-row metadata (and, when
a score is asked for, the small decoded arrays the proxy models train on). Each stage declares the columns it
needs and makes; `check_stages` validates the chain before any work starts.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.core.config import Config
from pipeline.core.errors import UserInputError
from pipeline.core.storage import join, output_lock
from stages.decode import DecodeOptions, DecodeStage
from stages.manifest import MANIFEST_NAME, QUARANTINE_NAME, write_manifest, write_quarantine
from stages.read import ImageListing, ReadBytes, list_images, read_images

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class StageChainError(ValueError):
    """A stage needs a column that no earlier stage makes."""


class NothingDecoded(UserInputError):
    """Every listed object was quarantined: there is nothing to score, prune or train on."""


def check_stages(stages: list[object], initial: tuple[str, ...]) -> None:
    """Fail before the run when a stage needs a column no earlier stage produces (NeMo Curator style)."""
    available = set(initial)
    for stage in stages:
        missing = set(getattr(stage, "requires", ())) - available
        if missing:
            raise StageChainError(
                f"stage {getattr(stage, 'name', stage)!r} needs column(s) {sorted(missing)}, "
                f"but only {sorted(available)} are available at that point"
            )
        available |= set(getattr(stage, "produces", ()))


@dataclass
class Decoded:
    """The decoded input: metadata rows for good images, their pixels (optional), and the quarantine."""

    frame: pd.DataFrame  # path, sha256, label, class_name — one row per decodable image, sorted by path
    images: np.ndarray | None  # N×S×S×3 uint8 in `frame` order, when kept
    quarantine: pd.DataFrame  # path, sha256, reason, error
    classes: list[str] = field(default_factory=list)


@dataclass
class CurateResult:
    run_id: str
    manifest_url: str
    quarantine_url: str
    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    seconds: float
    counts: dict[str, int]

    @property
    def images_per_second(self) -> float:
        total = len(self.manifest) + len(self.quarantine)
        return total / self.seconds if self.seconds > 0 else 0.0


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def decode_listing(
    listing: ImageListing, config: Config, keep_images: bool, progress: Progress | None = None
) -> Decoded:
    """Read and decode every listed object with Ray Data; returns good rows (and pixels) and quarantine rows."""
    decode = DecodeStage(DecodeOptions.from_config(config.decode))
    check_stages([ReadBytes(config.data.storage_options), decode], initial=("path", "label", "class_name"))
    ds = read_images(listing, config.data, then=[decode])
    total = len(listing)
    rows: list[pd.DataFrame] = []
    images: list[np.ndarray] = []
    done = 0
    for batch in ds.iter_batches(
        batch_size=config.data.read_batch_size, batch_format="numpy", prefetch_batches=4
    ):
        n = len(batch["path"])
        rows.append(
            pd.DataFrame(
                {k: batch[k] for k in ("path", "sha256", "label", "class_name", "ok", "reason", "error")}
            )
        )
        if keep_images:
            images.append(batch["image"][batch["ok"]])
        done += n
        if progress:
            progress("decode", done, total)
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["path", "ok"])
    good_mask = table["ok"].astype(bool).to_numpy()
    good = table[good_mask][["path", "sha256", "label", "class_name"]].reset_index(drop=True)
    pixels = np.concatenate(images) if (keep_images and images) else None
    order = np.argsort(good["path"].to_numpy(dtype=str), kind="stable")
    good = good.iloc[order].reset_index(drop=True)
    if pixels is not None:
        pixels = pixels[order]
    bad = table[~good_mask][["path", "sha256", "reason", "error"]].sort_values("path").reset_index(drop=True)
    return Decoded(frame=good, images=pixels, quarantine=bad, classes=listing.classes)


def curate(config: Config, progress: Progress | None = None, output: str | None = None) -> CurateResult:
    """Run curation per `config` and write OUTPUT/manifest.parquet and OUTPUT/quarantine.parquet."""
    start = time.perf_counter()
    run_id = config.run_id or new_run_id()
    output = output or config.output
    listing = list_images(config.data)
    log.info(
        "listed %d objects in %d classes under %s", len(listing), len(listing.classes), config.data.input
    )
    if progress:
        progress("list", len(listing), len(listing))
    scoring = config.score.method != "none"
    score_counts: dict[str, int] = {}
    decoded = decode_listing(listing, config, keep_images=scoring, progress=progress)
    frame = decoded.frame.copy()
    if scoring and len(frame):
        from stages.prune import prune
        from stages.score import score_decoded

        outcome = score_decoded(decoded, config, progress=progress)
        frame = prune(outcome.frame, config.prune)
        score_counts = {"scored": outcome.scored, "cached": outcome.cached}
    elif config.prune.policy == "random" and len(frame):  # the random baseline needs no score
        from stages.prune import prune

        frame["score"] = np.nan
        frame = prune(frame, config.prune)
    else:
        if not scoring and config.prune.policy != "none":
            log.info(
                "score.method=none: prune.policy=%s needs scores, so every image is kept "
                "(prune.policy=random prunes without them)",
                config.prune.policy,
            )
        frame["score"] = np.nan
        frame["kept"] = True
        frame["reason"] = "kept"
    metadata = {"run_id": run_id, "config": config.redacted(), "classes": listing.classes}
    manifest_url = join(output, MANIFEST_NAME)
    quarantine_url = join(output, QUARANTINE_NAME)
    so = config.data.storage_options
    # each file is atomic; the lock keeps the pair from one run when two runs share an output
    with output_lock(output, so):
        write_quarantine(quarantine_url, decoded.quarantine, metadata, so)
        write_manifest(manifest_url, frame, metadata, so)
    counts = Counter(frame["reason"].tolist()) + Counter(
        f"quarantine:{r}" for r in decoded.quarantine["reason"]
    )
    counts.update(score_counts)  # scored = cache misses scored this run, cached = cache hits
    seconds = time.perf_counter() - start
    if frame.empty:  # both files are written (one run's pair); the quarantine says why each file failed
        reasons = ", ".join(f"{r} {n}" for r, n in Counter(decoded.quarantine["reason"]).most_common())
        raise NothingDecoded(
            f"none of the {len(listing)} objects under {config.data.input} decoded ({reasons}); "
            f"each file's reason is in {quarantine_url}"
        )
    log.info("curated %d objects in %.1f s", len(listing), seconds)
    return CurateResult(
        run_id=run_id,
        manifest_url=manifest_url,
        quarantine_url=quarantine_url,
        manifest=frame,
        quarantine=decoded.quarantine,
        seconds=seconds,
        counts=dict(counts),
    )
