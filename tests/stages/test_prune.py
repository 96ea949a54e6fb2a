"""Pruning policies: exact keep counts, reasons, class balance, CCS bin coverage, seeded randomness."""

from __future__ import annotations

import typing

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import PruneConfig
from stages import prune as prune_module
from stages.base import StageChainError, check_chain
from stages.prune import PruneStage, balanced_quotas, prune

POLICIES = ("keep-hard", "offset", "keep-easy", "class-balanced", "stratified", "random")


def scored_frame(n: int = 200, classes: int = 4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "path": [f"img_{i:04d}.png" for i in range(n)],
            "label": rng.integers(0, classes, size=n),
            "score": rng.random(n),
        }
    )


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("keep", [0.05, 0.3, 0.7, 0.95, 1.0])
def test_exact_keep_count_and_reasons(policy: str, keep: float) -> None:
    frame = scored_frame()
    out = prune(frame, PruneConfig(policy=policy, keep=keep))
    assert int(out["kept"].sum()) == round(keep * len(frame))
    assert (out["reason"] == "kept").to_numpy().tolist() == out["kept"].tolist()
    assert set(out["reason"][~out["kept"]]) <= {
        "pruned:easy",
        "pruned:hard",
        "pruned:random",
        "pruned:stratified",
    }
    pd.testing.assert_frame_equal(out[frame.columns], frame)  # rows and order unchanged


def test_keep_count_wins_over_fraction() -> None:
    out = prune(scored_frame(), PruneConfig(policy="offset", keep=0.1, keep_count=123))
    assert int(out["kept"].sum()) == 123


def test_keep_hard_easy_and_offset_choose_by_score() -> None:
    frame = scored_frame()
    rank = frame["score"].rank(ascending=False, method="first").to_numpy()  # 1 = hardest
    hard = prune(frame, PruneConfig(policy="keep-hard", keep=0.3))
    assert set(rank[hard["kept"]]) == set(range(1, 61))
    assert (hard["reason"][~hard["kept"]] == "pruned:easy").all()
    easy = prune(frame, PruneConfig(policy="keep-easy", keep=0.3))
    assert set(rank[easy["kept"]]) == set(range(141, 201))
    offset = prune(frame, PruneConfig(policy="offset", keep=0.5, offset=0.1))
    assert set(rank[offset["kept"]]) == set(range(21, 121))  # hardest 20 dropped, next 100 kept
    assert set(rank[offset["reason"] == "pruned:hard"]) == set(range(1, 21))
    assert set(rank[offset["reason"] == "pruned:easy"]) == set(range(121, 201))


def test_offset_yields_to_the_keep_count() -> None:
    out = prune(scored_frame(), PruneConfig(policy="offset", keep=0.95, offset=0.1))
    assert int(out["kept"].sum()) == 190 and int((out["reason"] == "pruned:hard").sum()) == 10


def test_class_balanced_within_one() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2, 3], [100, 60, 30, 10])  # imbalanced
    frame = pd.DataFrame({"path": [f"{i}" for i in range(200)], "label": labels, "score": rng.random(200)})
    out = prune(frame, PruneConfig(policy="class-balanced", keep=0.5))
    per_class = out[out["kept"]].groupby("label").size().reindex([0, 1, 2, 3], fill_value=0)
    assert per_class.sum() == 100
    assert per_class[3] == 10  # the small class keeps all it has
    big = per_class[[0, 1, 2]]
    assert big.max() - big.min() <= 1  # the rest share evenly
    # inside each class the hardest are dropped first (offset), then the hardest of the rest are kept
    cls0 = out[out["label"] == 0].sort_values("score", ascending=False)
    assert cls0["reason"].iloc[:10].eq("pruned:hard").all() and cls0["kept"].iloc[10:40].all()


def test_balanced_quotas() -> None:
    assert balanced_quotas(np.array([10, 10, 10]), 16).tolist() in ([5, 5, 6], [5, 6, 5], [6, 5, 5])
    assert balanced_quotas(np.array([2, 50, 50]), 40).tolist() == [2, 19, 19]
    assert balanced_quotas(np.array([3, 4]), 100).tolist() == [3, 4]


def test_stratified_covers_every_bin() -> None:
    rng = np.random.default_rng(2)
    score = np.concatenate([rng.normal(0.2, 0.02, 900), rng.uniform(0, 1, 100)])  # mostly easy, long tail
    frame = pd.DataFrame({"path": [f"{i}" for i in range(1000)], "label": 0, "score": score})
    config = PruneConfig(policy="stratified", keep=0.1, offset=0.05, bins=10)
    out = prune(frame, config)
    assert int(out["kept"].sum()) == 100
    rest = out[out["reason"] != "pruned:hard"]
    edges = np.linspace(rest["score"].min(), rest["score"].max(), 11)
    bins = np.clip(np.searchsorted(edges, rest["score"], side="right") - 1, 0, 9)
    for b in range(10):
        in_bin = rest[bins == b]
        if len(in_bin):
            assert in_bin["kept"].any(), f"bin {b} ({len(in_bin)} rows) has nothing kept"
    # a plain keep-hard would take nearly all from the tail; CCS keeps plenty of the dense easy mode
    assert (out[out["kept"]]["score"] < 0.3).sum() >= 10


def test_random_is_seeded() -> None:
    frame = scored_frame()
    a = prune(frame, PruneConfig(policy="random", keep=0.4, seed=7))
    b = prune(frame, PruneConfig(policy="random", keep=0.4, seed=7))
    c = prune(frame, PruneConfig(policy="random", keep=0.4, seed=8))
    assert a["kept"].tolist() == b["kept"].tolist() != c["kept"].tolist()
    assert (a["reason"][~a["kept"]] == "pruned:random").all()


def test_duplicates_pruned_first() -> None:
    frame = scored_frame(20)
    frame["duplicate_group"] = np.arange(20)
    frame.loc[[5, 9], "duplicate_group"] = 3  # rows 3, 5, 9 are near-duplicates
    out = prune(frame, PruneConfig(policy="keep-hard", keep=1.0))
    assert out.loc[[5, 9], "reason"].eq("pruned:duplicate").all()
    assert out["kept"].sum() == 18 and out.loc[3, "kept"]
    kept_all = prune(frame, PruneConfig(policy="keep-hard", keep=1.0, drop_duplicates=False))
    assert kept_all["kept"].all()


def test_missing_scores_count_as_median_and_no_scores_is_an_error() -> None:
    frame = scored_frame(10)
    frame.loc[0, "score"] = np.nan
    out = prune(frame, PruneConfig(policy="keep-hard", keep=0.5))
    assert int(out["kept"].sum()) == 5
    frame["score"] = np.nan
    with pytest.raises(ValueError, match="needs a `score` column"):
        prune(frame, PruneConfig(policy="offset"))
    assert prune(frame, PruneConfig(policy="random", keep=0.5))["kept"].sum() == 5


def test_every_policy_has_an_entry() -> None:
    """`prune.policy` picks a policy by name: each choice the config allows has one."""
    policies = prune_module.POLICIES
    assert set(policies) == set(typing.get_args(PruneConfig.model_fields["policy"].annotation))
    assert [name for name, p in policies.items() if not p.needs_score] == ["random", "none"]


def test_prune_stage_is_prune_over_every_row() -> None:
    """The stage gives what `prune` gives on the same rows, and passes the other columns on."""
    frame = scored_frame()
    frame["duplicate_group"] = np.arange(len(frame))
    frame.loc[[7, 8], "duplicate_group"] = 6
    config = PruneConfig(policy="class-balanced", keep=0.4)
    batch = {name: frame[name].to_numpy() for name in frame.columns}
    out = PruneStage(config)(batch)
    want = prune(frame, config)
    assert out["kept"].tolist() == want["kept"].tolist() and out["reason"].tolist() == want["reason"].tolist()
    assert out["path"] is batch["path"]
    assert PruneStage(config).kind == "all-to-all"


def test_prune_stage_declares_what_its_policy_needs() -> None:
    """A policy that ranks by score needs `score`; class-balanced needs `label` too; random needs neither —
    checked when the chain is built, not when the policy runs."""
    assert PruneStage(PruneConfig(policy="offset")).inputs == ("score",)
    assert PruneStage(PruneConfig(policy="class-balanced")).inputs == ("score", "label")
    assert PruneStage(PruneConfig(policy="random")).inputs == ()
    with pytest.raises(StageChainError, match=r"'prune' needs column\(s\) \['label'\]"):
        check_chain([PruneStage(PruneConfig(policy="class-balanced"))], ("path", "score"))
