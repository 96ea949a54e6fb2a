"""Prune stage: choose which scored examples to keep, and record why each other one was dropped.

Pure pandas/numpy and deterministic for `prune.seed`, so Ray Tune can re-prune one scored manifest per
trial without Ray Data; `PruneStage` is the same as an all-to-all stage. `prune.policy` picks a `Policy`
from `POLICIES` by name. Input: a frame with `score` (higher = harder; NaN = unknown, treated as the median
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
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core.config import PruneConfig
from pipeline.core.errors import UserInputError
from stages.base import ALL_TO_ALL, Batch, Stage

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


# ---------------------------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Pick:
    """What a policy chose among the candidate rows (positions into them)."""

    kept: np.ndarray  # positions kept
    reason: str  # the reason of every candidate neither kept nor in `hard`
    hard: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # dropped as too hard


@dataclass(frozen=True)
class Candidates:
    """The rows a policy chooses from (after near-duplicates are set aside), and what it may use."""

    score: (
        np.ndarray
    )  # (n,) higher = harder; unknown scores already replaced by the median (zeros when unused)
    labels: np.ndarray | None  # (n,) class per row, when the frame has `label`
    target: int  # how many to keep
    config: PruneConfig
    rng: np.random.Generator  # seeded with prune.seed


def _keep_all(c: Candidates) -> Pick:
    return Pick(np.arange(len(c.score)), "kept")


def _random(c: Candidates) -> Pick:
    return Pick(c.rng.permutation(len(c.score))[: c.target], "pruned:random")


def _keep_hard(c: Candidates) -> Pick:
    return Pick(_order_hard_first(c.score)[: c.target], "pruned:easy")


def _keep_easy(c: Candidates) -> Pick:
    return Pick(_order_hard_first(c.score)[::-1][: c.target], "pruned:hard")


def _offset(c: Candidates) -> Pick:
    kept, hard = _offset_pick(c.score, c.target, c.config.offset)
    return Pick(kept, "pruned:easy", hard)


def _stratified(c: Candidates) -> Pick:
    kept, hard = _stratified_pick(c.score, c.target, c.config.offset, c.config.bins, c.rng)
    return Pick(kept, "pruned:stratified", hard)


def _members_by_class(labels: np.ndarray) -> list[np.ndarray]:
    """Each class's positions, ascending, classes in sorted order (`flatnonzero(labels == k)` per class).

    One stable sort instead of a scan per class: 1,000 classes over 10M rows is 10^10 comparisons the other
    way.
    """
    if len(labels) == 0:
        return []
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    return np.split(order, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1)


def _class_balanced(c: Candidates) -> Pick:
    """The offset rule inside each class, with per-class quotas from `balanced_quotas`."""
    assert c.labels is not None  # Policy.needs_labels: checked before
    members = _members_by_class(c.labels)
    quotas = balanced_quotas(np.asarray([len(m) for m in members]), c.target)
    kept, hard = [], []
    for m, q in zip(members, quotas, strict=True):
        kept_local, hard_local = _offset_pick(c.score[m], int(q), c.config.offset)
        kept.append(m[kept_local])
        hard.append(m[hard_local])
    empty = np.zeros(0, dtype=np.int64)
    return Pick(
        np.concatenate(kept) if kept else empty, "pruned:easy", np.concatenate(hard) if hard else empty
    )


@dataclass(frozen=True)
class Policy:
    """One `prune.policy`: its choice, and the columns it needs."""

    pick: Callable[[Candidates], Pick]
    needs_score: bool = True
    needs_labels: bool = False


POLICIES: dict[str, Policy] = {
    "keep-hard": Policy(_keep_hard),
    "keep-easy": Policy(_keep_easy),
    "offset": Policy(_offset),
    "stratified": Policy(_stratified),
    "class-balanced": Policy(_class_balanced, needs_labels=True),
    "random": Policy(_random, needs_score=False),
    "none": Policy(_keep_all, needs_score=False),
}


def policy_for(name: str) -> Policy:
    if name not in POLICIES:
        raise UserInputError(f"unknown prune.policy {name!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[name]


# ---------------------------------------------------------------------------------------------- prune


def _first_of_each_group(frame: pd.DataFrame, config: PruneConfig) -> np.ndarray:
    """Row positions left to choose from: all rows, or with `drop_duplicates` the first row of each
    near-duplicate group (rows without a group count as their own)."""
    if not (config.drop_duplicates and "duplicate_group" in frame and frame["duplicate_group"].notna().any()):
        return np.arange(len(frame))
    groups = frame["duplicate_group"].to_numpy()
    first = ~pd.Series(groups).duplicated(keep="first").to_numpy() | pd.isna(groups)
    return np.flatnonzero(first)


def _candidate_scores(frame: pd.DataFrame, rows: np.ndarray, policy: str) -> np.ndarray:
    """The candidates' scores, an unknown (NaN) score counted as the median."""
    if "score" not in frame or frame["score"].isna().all():
        raise UserInputError(f"prune.policy={policy} needs a `score` column with values; score first")
    raw = frame["score"].to_numpy(dtype=np.float64)[rows]
    unknown = np.isnan(raw)
    if unknown.any():
        log.warning("%d rows have no score; they count as the median score", int(unknown.sum()))
    return np.where(unknown, np.nanmedian(raw), raw)


# Reasons as small codes while choosing (an object array of 10M strings costs 80 MB of pointers per
# assignment pass, a Unicode array 17 bytes a character); strings are made once, at the end.
REASONS = ("kept", "pruned:duplicate", "pruned:easy", "pruned:hard", "pruned:random", "pruned:stratified")
_CODE = {reason: np.int8(i) for i, reason in enumerate(REASONS)}


def _prune_codes(frame: pd.DataFrame, config: PruneConfig) -> np.ndarray:
    """Each row's reason as an index into `REASONS` (0 = kept), per `config` (see the module docstring)."""
    policy = policy_for(config.policy)
    n = len(frame)
    candidates = _first_of_each_group(frame, config)
    codes = np.full(n, _CODE["pruned:duplicate"] if len(candidates) < n else _CODE["kept"], dtype=np.int8)
    if policy.needs_score:
        score = _candidate_scores(frame, candidates, config.policy)
    else:
        score = np.zeros(len(candidates))
    if policy.needs_labels and "label" not in frame:
        raise UserInputError(f"prune.policy={config.policy} needs a `label` column")
    labels = frame["label"].to_numpy()[candidates] if "label" in frame else None
    target = min(keep_target(n, config), len(candidates))
    rng = np.random.default_rng(config.seed)
    pick = policy.pick(Candidates(score, labels, target, config, rng))
    codes[candidates] = _CODE[pick.reason]
    codes[candidates[pick.hard]] = _CODE["pruned:hard"]
    codes[candidates[pick.kept]] = _CODE["kept"]
    log.info("prune %s: kept %d of %d", config.policy, int(np.count_nonzero(codes == 0)), n)
    return codes


def prune(frame: pd.DataFrame, config: PruneConfig) -> pd.DataFrame:
    """Add `kept` and `reason` to a copy of `frame` per `config` (see the module docstring).

    The copy is shallow: with pandas' copy-on-write the caller's frame never sees the new columns, and a
    10M-row frame of paths and hashes is not duplicated to add two columns.
    """
    codes = _prune_codes(frame, config)
    out = frame.copy(deep=False)
    out["kept"] = codes == 0
    out["reason"] = pd.array(pa.array(REASONS).take(pa.array(codes)), dtype="str")
    return out


class PruneStage(Stage):
    """All-to-all: `prune` over every scored row at once, adding `kept` and `reason`.

    Global by nature: whether a row is kept depends on every other row's score (its rank, the hardest
    fraction, its class's quota, the score bins), so it cannot run per batch.
    """

    name = "prune"
    kind = ALL_TO_ALL
    outputs = ("kept", "reason")

    def __init__(self, config: PruneConfig) -> None:
        policy = policy_for(config.policy)
        self.config = config
        needs = {"score": policy.needs_score, "label": policy.needs_labels}
        self.inputs = tuple(name for name, needed in needs.items() if needed)

    def process(self, batch: Batch) -> Batch:
        used = [name for name in ("score", "label", "duplicate_group") if name in batch]
        codes = _prune_codes(pd.DataFrame({name: batch[name] for name in used}, copy=False), self.config)
        # `reason` as categories (one byte a row; an object array would cost 8): the strings `prune` gives
        reason = pd.Categorical.from_codes(codes, categories=list(REASONS))
        return {**batch, "kept": codes == 0, "reason": reason}


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
