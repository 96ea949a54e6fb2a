"""Prune scale: prune, manifest write and score-cache store + lookup over 10,000,000 rows of scores, no pixels.

At internet scale the driver holds one metadata row per image (path, sha256, label, scores), never pixels,
so what bounds a curation there is whether the all-to-all steps — prune (global by nature: a row's fate
depends on every other row's score), the manifest write and the score-cache lookup — fit in a driver's time
and memory. Workload: 10,000,000 synthetic rows shaped like the manifest's (`path` such as
`s3://bucket/class_0042/img_0001234.jpg`, 64-hex-digit `sha256`, `label` over 1,000 classes, `class_name`,
EL2N / GraNd / forgetting / prototype scores with 0.01 % unknown, and 1 % near-duplicates), generated with
vectorised numpy / pyarrow. The strings stay Arrow strings (pandas' default `str` dtype, Arrow-backed, as a
Ray Data batch in pandas or pyarrow format holds them): 10M Python `str` objects alone would take 2.2 GB.

Steps, each timed and memory-sampled on its own, in one process (the driver), one after the other:
- `PruneStage(policy).process(batch)` for keep-hard, offset, keep-easy, class-balanced, stratified and
  random (keep 0.7, the default offset 0.1 and 10 bins, near-duplicates dropped);
- `ManifestStage(url).process(batch)`: the manifest Parquet file, written atomically to a local folder;
- `ScoreCache.store` of every row's scores, then the lookup of every (sha256, label) pair as `score_images`
  does it (an incremental rerun: all hits), over a local folder: `split_by_cache` (`ScoreCache.lookup`,
  whose result is aligned to the query: a found mask and the score columns, no keys) and `merge_scores`
  (the score columns of every row, taken by that mask). The lookup holds what a rerun's driver holds when
  it looks up: the rows' keys (path, sha256, label, class name). The scores are what it looks up, and
  prune's columns come later.

Memory: a sampler thread reads the process's PSS and RSS every 0.05 s (`benchmarks.common.PeakMemory`, as
`memory.py` does for a process tree); the kernel's exact RSS high-water mark (`VmHWM`, reset per step
through `/proc/self/clear_refs` where allowed) catches what falls between samples. A step's `_peak_` rows
include the data it works on (held before and after it); its `_extra_mb` row is its peak over what the
process held when it started. Targets (issue 24): the whole thing under 2 minutes on 2 cores and under
3 GiB (3,221 MB) of peak driver memory.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/prune_scale.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import gc
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.common import PeakMemory, Row, main, tiny
from pipeline.core.config import PruneConfig
from stages.base import Batch
from stages.manifest import ManifestStage
from stages.prune import PruneStage
from stages.score import SCORE_COLUMNS, merge_scores, split_by_cache
from stages.score_cache import CACHE_COLUMNS, ScoreCache

log = logging.getLogger(__name__)

# The targets (read by run_all.py): the whole thing at 10M rows in < 2 min and < 3 GiB peak.
TARGETS = {
    "prune_scale_total_seconds": ("<", 120.0),
    "prune_scale_peak_pss_mb": ("<", 3221.2),
    "prune_scale_peak_rss_mb": ("<", 3221.2),
}

MB = 1_000_000
POLICIES = ("keep-hard", "offset", "keep-easy", "class-balanced", "stratified", "random")
CLASSES = 1000
UNKNOWN_SCORE_SHARE = 0.0001  # rows whose score is NaN (prune counts them as the median)
DUPLICATE_SHARE = 0.01  # rows that are a near-duplicate of the row before them
SAMPLE_S = 0.05


def workload(quick: bool) -> int:
    """Rows. `--quick` keeps the full 10M: the targets are stated at that size, and it takes ~1–2 min."""
    return 20_000 if tiny() else 10_000_000


# ---------------------------------------------------------------------------------------------- data


def hex_digests(rng: np.random.Generator, n: int) -> pa.Array:
    """`n` random 64-hex-digit strings as one Arrow string array, built from buffers (no Python strings):
    a 256-entry table maps each random byte to its two ASCII hex digits."""
    table = np.frombuffer(b"".join(f"{b:02x}".encode() for b in range(256)), dtype=np.uint16)
    chars = table[rng.integers(0, 256, size=(n, 32), dtype=np.uint8)].view(np.uint8).reshape(-1)
    wide = 64 * n >= 2**31  # 32-bit offsets address up to 2 GiB of characters
    offsets = np.arange(0, 64 * (n + 1), 64, dtype=np.int64 if wide else np.int32)
    kind = pa.large_string() if wide else pa.string()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def image_paths(labels: np.ndarray, names: pa.Array) -> pa.Array:
    """`s3://bucket/<class>/img_<7-digit row>.jpg` per row, with Arrow's string kernels."""
    index = pc.utf8_lpad(pc.cast(pa.array(np.arange(len(labels))), pa.string()), 7, "0")
    folder = pc.take(names, pa.array(labels))
    return pc.binary_join_element_wise("s3://bucket/", folder, "/img_", index, ".jpg", "")


def synthetic_batch(n: int, seed: int = 0) -> Batch:
    """A scored batch of `n` rows with the columns curation hands to prune and the manifest.

    Strings are Arrow-backed pandas arrays (`str`), numbers numpy arrays. `score` is `el2n` (the
    same array, as `--score el2n` makes it). `duplicate_group` is each row's own index except for 1 % of
    rows, which share the group of the row before them (`near_duplicate_groups`' convention).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=n)
    names = pa.array([f"class_{k:04d}" for k in range(CLASSES)])
    el2n = rng.gamma(2.0, 0.25, size=n)
    el2n[rng.random(n) < UNKNOWN_SCORE_SHARE] = np.nan
    groups = np.arange(n, dtype=np.int64)
    duplicates = np.flatnonzero(rng.random(n) < DUPLICATE_SHARE)
    duplicates = duplicates[duplicates > 0]
    groups[duplicates] = groups[duplicates - 1]
    return {
        "path": pd.array(image_paths(labels, names), dtype="str"),
        "sha256": pd.array(hex_digests(rng, n), dtype="str"),
        "label": labels,
        "class_name": pd.Categorical.from_codes(labels, categories=names.to_pylist()),
        "el2n": el2n,
        "el2n_std": rng.gamma(1.0, 0.05, size=n),
        "grand": el2n * rng.uniform(0.8, 1.2, size=n),
        "forgetting": rng.poisson(1.0, size=n).astype(np.float64),
        "prototype": rng.random(n),
        "duplicate_group": groups,
        "score": el2n,
    }


# ---------------------------------------------------------------------------------------------- memory


def _reset_high_water_mark() -> bool:
    """Reset this process's VmHWM (Linux `clear_refs` 5); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> float:
    """This process's peak RSS in bytes since start (or the last reset), from /proc/self/status."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    return 0.0


def _settle() -> float:
    """Free what the last step left (Python cycles, Arrow's pool) and return the process's PSS in bytes."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    info = psutil.Process().memory_full_info()
    return float(getattr(info, "pss", info.rss))


@dataclass
class Step:
    """One measured step: wall seconds, peak PSS / RSS while it ran, and PSS when it started (bytes)."""

    name: str
    seconds: float = 0.0
    peak_pss: float = 0.0
    peak_rss: float = 0.0
    start_pss: float = 0.0

    def rows(self) -> list[Row]:
        prefix = f"prune_scale_{self.name}"
        return [
            (f"{prefix}_seconds", self.seconds),
            (f"{prefix}_peak_pss_mb", self.peak_pss / MB),
            (f"{prefix}_peak_rss_mb", self.peak_rss / MB),
            (f"{prefix}_extra_mb", max(self.peak_pss - self.start_pss, 0.0) / MB),
        ]


@contextlib.contextmanager
def measured(name: str) -> Iterator[Step]:
    """Time the block and sample this process's memory while it runs."""
    step = Step(name, start_pss=_settle())
    exact = _reset_high_water_mark()
    with PeakMemory(os.getpid(), interval=SAMPLE_S) as peak:
        start = time.perf_counter()
        yield step
        step.seconds = time.perf_counter() - start
    step.peak_pss = peak.peak_pss
    step.peak_rss = max(peak.peak_rss, _high_water_mark() if exact else 0.0)
    log.info(
        "%s: %.2f s, peak PSS %.0f MB, peak RSS %.0f MB (started at %.0f MB)",
        name,
        step.seconds,
        step.peak_pss / MB,
        step.peak_rss / MB,
        step.start_pss / MB,
    )


# ---------------------------------------------------------------------------------------------- steps


def prune_step(batch: Batch, policy: str) -> Callable[[], Batch]:
    config = PruneConfig(policy=policy, keep=0.7, seed=0)
    return lambda: PruneStage(config).process(batch)


def check_pruned(out: Batch, policy: str, n: int) -> None:
    """The step did its job: the keep count it promises (fewer only when duplicates leave too few)."""
    kept = int(np.count_nonzero(out["kept"]))
    duplicates = int(np.count_nonzero(np.asarray(out["reason"]) == "pruned:duplicate"))
    if kept != min(round(0.7 * n), n - duplicates):
        raise AssertionError(f"{policy}: kept {kept} of {n} rows, expected {round(0.7 * n)}")


RERUN_COLUMNS = ("path", "sha256", "label", "class_name")  # what a rerun's driver holds at its lookup


def set_aside(batch: Batch, folder: str) -> Batch:
    """The columns an incremental rerun's driver holds when it looks its rows up in the score cache: the
    decoded rows' keys (`RERUN_COLUMNS`). Their scores are what the lookup produces, and prune's columns
    come after it, so neither is in memory then. The stored scores go to `.npy` files in `folder`, for
    `check_cached` to read back once the lookup is measured."""
    for name in SCORE_COLUMNS:
        np.save(os.path.join(folder, f"{name}.npy"), np.asarray(batch[name]))
    return {name: batch[name] for name in RERUN_COLUMNS}


def check_cached(found: np.ndarray, scores: pd.DataFrame, folder: str) -> None:
    """The lookup did its job: every stored row found, with the scores it was stored with (`set_aside`)."""
    if not found.all():
        raise AssertionError(f"cache lookup: {int(found.sum())} hits of {len(found)} stored rows")
    for name in SCORE_COLUMNS:
        stored = np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
        np.testing.assert_array_equal(scores[name].to_numpy(), stored, err_msg=f"cached {name}")


def run(quick: bool = False) -> list[Row]:
    n = workload(quick)
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="maskdiet-bench-prune-scale-") as tmp:
        with measured("generate") as generate:
            batch = synthetic_batch(n)
        log.info("%d synthetic rows in %.1f s", n, generate.seconds)
        for policy in POLICIES:
            with measured(policy.replace("-", "_")) as step:
                out = prune_step(batch, policy)()
            check_pruned(out, policy, n)
            steps.append(step)
            if policy != POLICIES[-1]:
                del out
        batch = out  # the manifest gets the last policy's kept / reason, as curate would
        url = os.path.join(tmp, "run", "manifest.parquet")
        with measured("manifest") as step:
            ManifestStage(url, {"run_id": "prune-scale", "rows": n}).process(batch)
        steps.append(step)
        manifest_bytes = os.path.getsize(url)
        cache = ScoreCache(os.path.join(tmp, "cache"), "prune-scale")
        with measured("cache_store") as step:
            cache.store(pd.DataFrame({name: batch[name] for name in CACHE_COLUMNS}, copy=False))
        steps.append(step)
        rerun = set_aside(batch, tmp)
        del batch, out
        with measured("cache_lookup") as step:
            hits = split_by_cache(cache, pd.Series(rerun["sha256"], copy=False), rerun["label"])
            scores = merge_scores(hits, None)  # all hits: nothing new to score
        steps.append(step)
        check_cached(hits.found, scores, tmp)
        del hits, scores, rerun
    prune_steps = steps[: len(POLICIES)]
    rows: list[Row] = [("prune_scale_rows", float(n)), ("prune_scale_classes", float(CLASSES))]
    rows += [r for r in generate.rows() if not r[0].endswith("_extra_mb")]
    rows.append(("prune_scale_data_mb", (steps[0].start_pss - generate.start_pss) / MB))
    for step in steps:
        rows += step.rows()
    rows += [
        ("prune_scale_manifest_file_mb", manifest_bytes / MB),
        ("prune_scale_prune_max_seconds", max(s.seconds for s in prune_steps)),
        ("prune_scale_prune_max_peak_pss_mb", max(s.peak_pss for s in prune_steps) / MB),
        ("prune_scale_total_seconds", sum(s.seconds for s in steps)),
        ("prune_scale_peak_pss_mb", max(s.peak_pss for s in steps) / MB),
        ("prune_scale_peak_rss_mb", max(s.peak_rss for s in steps) / MB),
    ]
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
