"""Prune stage: choose which scored examples to keep, and record why each other one was dropped.

Pure pandas/numpy and deterministic for `prune.seed`, so Ray Tune can re-prune one scored manifest per
trial without Ray Data. Input: a frame with `score` (higher = harder; NaN = unknown, treated as the median
score) and optionally `label` and `duplicate_group`. Output: the same rows, same order, plus `kept` (bool)
and `reason`:

- `pruned:duplicate` — another image of its near-duplicate group is the one considered (the first by row).
- `pruned:hard` — among the hardest (offset / stratified drop these first as likely label noise; keep-easy
  drops them as too hard).
- `pruned:easy` — among the easiest (keep-hard, offset, class-balanced).
- `pruned:stratified` — left out by CCS's even sampling across score bins.
- `pruned:random` — not drawn by the random baseline.

Policies (n = rows considered after duplicates, t = the keep target):

- `keep-hard`: the t hardest. `keep-easy`: the t easiest.
- `offset`: drop the hardest min(round(offset·n), n − t), then keep the t hardest of the rest (the keep
  count wins when both cannot hold).
- `class-balanced`: the offset rule inside each class, with each class keeping the same number (±1; a class
  too small to fill its share keeps all it has and the rest goes to the others).
- `stratified` (CCS, Zheng et al. 2023): drop the hardest as in offset, cut the rest into `bins` equal-width
  score bins, then fill bins from the smallest up, each taking an even share of what is left, sampled
  at random inside a bin.
- `random`: t rows drawn with `prune.seed`. `none`: keep everything but duplicates.

The keep target is `keep_count` when set, else round(keep · total rows), capped by the rows available.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.core.config import PruneConfig
from pipeline.core.errors import UserInputError

log = logging.getLogger(__name__)


def keep_target(total: int, config: PruneConfig) -> int:
    """How many rows to keep out of `total`."""
    target = config.keep_count if config.keep_count is not None else round(config.keep * total)
    return int(min(max(target, 0), total))


def _hard_drop(n: int, target: int, offset: float) -> int:
    return int(min(round(offset * n), max(n - target, 0)))


def _order_hard_first(score: np.ndarray) -> np.ndarray:
    """Positions sorted by score, hardest first; ties keep row order (stable)."""
    return np.argsort(-score, kind="stable")


def _offset_pick(score: np.ndarray, target: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, hard-dropped positions) for the offset rule on one group of rows."""
    order = _order_hard_first(score)
    drop = _hard_drop(len(score), target, offset)
    return order[drop : drop + target], order[:drop]


def balanced_quotas(sizes: np.ndarray, target: int) -> np.ndarray:
    """Split `target` across groups of `sizes` as evenly as possible (water-filling; ±1 between groups
    that are not full). Returns the per-group counts."""
    quotas = np.zeros(len(sizes), dtype=np.int64)
    remaining = min(int(target), int(sizes.sum()))
    open_groups = [i for i in np.argsort(sizes, kind="stable") if sizes[i] > 0]
    while remaining > 0 and open_groups:
        share = remaining // len(open_groups)
        extra = remaining % len(open_groups)
        smallest = open_groups[0]
        if sizes[smallest] - quotas[smallest] <= share:  # fill the smallest group, share the rest
            take = int(sizes[smallest] - quotas[smallest])
            quotas[smallest] += take
            remaining -= take
            open_groups.pop(0)
            continue
        for k, i in enumerate(open_groups):
            quotas[i] += share + (1 if k >= len(open_groups) - extra else 0)
        remaining = 0
    return quotas


def _stratified_pick(
    score: np.ndarray, target: int, offset: float, bins: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, hard-dropped positions) for CCS."""
    order = _order_hard_first(score)
    drop = _hard_drop(len(score), target, offset)
    hard, rest = order[:drop], order[drop:]
    if len(rest) == 0 or target == 0:
        return np.zeros(0, dtype=np.int64), hard
    values = score[rest]
    lo, hi = float(values.min()), float(values.max())
    edges = np.linspace(lo, hi, bins + 1)
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    members = [rest[which == b] for b in range(bins)]
    quotas = balanced_quotas(np.asarray([len(m) for m in members]), target)
    kept = [rng.choice(m, size=q, replace=False) for m, q in zip(members, quotas, strict=True) if q > 0]
    return (np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)), hard


def prune(frame: pd.DataFrame, config: PruneConfig) -> pd.DataFrame:
    """Add `kept` and `reason` to a copy of `frame` per `config` (see the module docstring)."""
    out = frame.copy()
    n_total = len(out)
    reason = np.full(n_total, "kept", dtype=object)
    candidates = np.arange(n_total)
    if config.drop_duplicates and "duplicate_group" in out and out["duplicate_group"].notna().any():
        groups = out["duplicate_group"].to_numpy()
        first = ~pd.Series(groups).duplicated(keep="first").to_numpy() | pd.isna(groups)
        reason[~first] = "pruned:duplicate"
        candidates = np.flatnonzero(first)
    target = min(keep_target(n_total, config), len(candidates))
    policy = config.policy
    rng = np.random.default_rng(config.seed)

    if policy in ("none", "random"):
        score = np.zeros(len(candidates))
    else:
        if "score" not in out or out["score"].isna().all():
            raise UserInputError(f"prune.policy={policy} needs a `score` column with values; score first")
        raw = out["score"].to_numpy(dtype=np.float64)[candidates]
        unknown = np.isnan(raw)
        if unknown.any():
            log.warning("%d rows have no score; they count as the median score", int(unknown.sum()))
        score = np.where(unknown, np.nanmedian(raw), raw)

    kept_pos: np.ndarray
    if policy == "none":
        kept_pos = np.arange(len(candidates))
    elif policy == "random":
        kept_pos = rng.permutation(len(candidates))[:target]
        reason[candidates] = "pruned:random"
    elif policy == "keep-hard":
        kept_pos = _order_hard_first(score)[:target]
        reason[candidates] = "pruned:easy"
    elif policy == "keep-easy":
        kept_pos = _order_hard_first(score)[::-1][:target]
        reason[candidates] = "pruned:hard"
    elif policy == "offset":
        kept_pos, hard = _offset_pick(score, target, config.offset)
        reason[candidates] = "pruned:easy"
        reason[candidates[hard]] = "pruned:hard"
    elif policy == "stratified":
        kept_pos, hard = _stratified_pick(score, target, config.offset, config.bins, rng)
        reason[candidates] = "pruned:stratified"
        reason[candidates[hard]] = "pruned:hard"
    elif policy == "class-balanced":
        if "label" not in out:
            raise UserInputError("prune.policy=class-balanced needs a `label` column")
        labels = out["label"].to_numpy()[candidates]
        classes = np.unique(labels)
        members = [np.flatnonzero(labels == c) for c in classes]
        quotas = balanced_quotas(np.asarray([len(m) for m in members]), target)
        reason[candidates] = "pruned:easy"
        picks = []
        for m, q in zip(members, quotas, strict=True):
            kept_local, hard_local = _offset_pick(score[m], int(q), config.offset)
            reason[candidates[m[hard_local]]] = "pruned:hard"
            picks.append(m[kept_local])
        kept_pos = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
    else:
        raise UserInputError(f"unknown prune.policy {policy!r}")

    reason[candidates[kept_pos]] = "kept"
    out["kept"] = reason == "kept"
    out["reason"] = reason.astype(str)
    log.info("prune %s: kept %d of %d", policy, int(out["kept"].sum()), n_total)
    return out


def score_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per class (and `all`): images, kept, and the score's mean / median / p90 / max."""

    def row(name: str, part: pd.DataFrame) -> dict[str, object]:
        score = part["score"].astype(float)
        return {
            "class": name,
            "images": len(part),
            "kept": int(part["kept"].sum()),
            "mean": float(score.mean()),
            "median": float(score.median()),
            "p90": float(score.quantile(0.9)),
            "max": float(score.max()),
        }

    rows = [row(str(name), part) for name, part in frame.groupby("class_name", sort=True)]
    rows.append(row("all", frame))
    return pd.DataFrame(rows)
