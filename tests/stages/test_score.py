"""Difficulty scores: EL2N/GraNd invariants, label-noise detection on real images, and offset pruning that
drops the injected wrong labels."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from pipeline.core.config import Config, PruneConfig, ScoreConfig, load_config
from pipeline.curate import Decoded, decode_listing
from pipeline.demo_data import DemoSpec, write_demo_data
from pipeline.models.proxy import ProxySpec, build_proxy
from stages.base import check_chain
from stages.pixels import PixelChunks
from stages.prune import prune
from stages.read import list_images
from stages.score import (
    SCORE_COLUMNS,
    SCORERS,
    ScoreModels,
    ScoreOutcome,
    ScoreStage,
    Unscored,
    el2n,
    grand_full,
    grand_last_layer,
    merge_scores,
    rows_per_block,
    score_images,
    score_rows,
    scorer_for,
    split_by_cache,
)
from stages.score_cache import ScoreCache

# Small enough for 2 busy cores, large enough that the effects are far from chance.
PER_CLASS = 50
SCORE_SETTINGS = ["score.epochs=8", "score.cache=false"]

# ---------------------------------------------------------------------------------------------- invariants


def test_el2n_bounds_and_known_values() -> None:
    rng = np.random.default_rng(0)
    c = 7
    probs = rng.dirichlet(np.full(c, 0.3), size=500)
    labels = rng.integers(0, c, size=500)
    scores = el2n(probs, labels)
    assert scores.min() >= 0 and scores.max() <= math.sqrt(2) + 1e-12
    uniform = el2n(np.full((3, c), 1 / c), np.array([0, 3, 6]))
    np.testing.assert_allclose(uniform, math.sqrt(1 - 1 / c))
    onehot = np.eye(c)[[1, 2]]
    np.testing.assert_allclose(el2n(onehot, np.array([1, 5])), [0.0, math.sqrt(2)])


def test_last_layer_grand_matches_autograd() -> None:
    torch.manual_seed(0)
    model = build_proxy("cnn-small", 5).eval()
    x = torch.randn(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        h = model.features(x)
        probs = F.softmax(model.head(h), dim=1)
    closed = grand_last_layer(probs.numpy(), y.numpy(), h.numpy())
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        norm = torch.sqrt(model.head.weight.grad.pow(2).sum() + model.head.bias.grad.pow(2).sum())
        assert closed[i] == pytest.approx(norm.item(), rel=1e-4)
    full = grand_full(model, x, y)
    model.zero_grad()
    F.cross_entropy(model(x[2:3]), y[2:3]).backward()
    every = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert full[2] == pytest.approx(every.item(), rel=1e-4)
    assert (full >= closed - 1e-5).all()  # the head's gradient is part of the whole


@pytest.mark.parametrize("compute", ["tasks", "actors"])
def test_score_rows_match_one_process(ray_cluster: None, compute: str) -> None:
    """Ray Data tasks and the actor pool give the numbers one in-process `ScoreModels` gives, in row order."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=300)
    # 8-row batches: a task's block then holds several batches (250 rows, 2 CPUs → 3 per block).
    config = ScoreConfig(num_models=2, compute=compute, score_batch_size=8, actors=2)
    spec = ProxySpec.from_config(config, 4)
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        states.append(build_proxy(spec.model, 4).state_dict())
    rows = rng.permutation(300)[:250]  # a subset, out of order
    per_block = rows_per_block(config, len(rows))
    assert per_block == (8 if compute == "actors" else 24), per_block
    pixels = PixelChunks.from_array(images, chunk_rows=64)  # rows of a block span several chunks
    got = score_rows(rows, pixels, labels, states, spec, config, embed=True)
    want = ScoreModels(states, spec, pixels, labels, embed=True)({"row": rows})
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_every_score_method_has_a_scorer() -> None:
    """`score.method` picks a scorer by name: each choice the config allows has one, `none` has none."""
    methods = set(typing.get_args(ScoreConfig.model_fields["method"].annotation)) - {"none"}
    assert set(SCORERS) == methods
    assert all(SCORERS[m].column == m for m in methods)  # `score` copies the column of the method's name
    with pytest.raises(ValueError, match="scores nothing"):
        scorer_for("none")


def test_score_stage_contract() -> None:
    """All-to-all (proxies train on every image first); needs the pixels; makes every score column."""
    stage = ScoreStage(load_config(None, ["score.method=grand"]), classes=["a", "b"])
    assert stage.kind == "all-to-all"
    assert check_chain([stage], ("path", "sha256", "label", "pixels")) >= {*SCORE_COLUMNS, "score"}
    unscored = Unscored()({"path": np.asarray(["a", "b"], dtype=object)})
    assert np.isnan(unscored["score"]).all() and len(unscored["score"]) == 2


def test_cache_hits_keep_their_scores_and_misses_get_this_runs(tmp_path: Path) -> None:
    """`split_by_cache` + `merge_scores`, row for row: a hit (every repeat of it too) keeps its cached
    scores, a relabelled or unknown image is a miss and gets this run's; no cache, every row is a miss."""
    cache = ScoreCache(str(tmp_path / "cache"), "k")
    cached = {name: [1.0, 2.0] for name in SCORE_COLUMNS}
    cache.store(pd.DataFrame({"sha256": ["a", "b"], "label": [0, 1], **cached}))
    sha256, labels = pd.Series(["b", "a", "b", "c", "a"], dtype="str"), np.array([1, 0, 0, 0, 0])
    hits = split_by_cache(cache, sha256, labels)
    assert hits.found.tolist() == [True, True, False, False, True]  # b under label 0 is another example
    new = pd.DataFrame({name: [7.0, 8.0] for name in SCORE_COLUMNS}, index=np.flatnonzero(~hits.found))
    columns = merge_scores(hits, new)
    assert list(columns.columns) == list(SCORE_COLUMNS)
    assert all(columns[name].tolist() == [2.0, 1.0, 7.0, 8.0, 1.0] for name in SCORE_COLUMNS)

    nothing = split_by_cache(None, sha256, labels)
    assert not nothing.found.any()
    everything = pd.DataFrame({name: np.arange(5.0) for name in SCORE_COLUMNS})
    pd.testing.assert_frame_equal(merge_scores(nothing, everything), everything)


# ---------------------------------------------------------------------------------------------- real data


@dataclass
class Scored:
    root: Path
    config: Config
    decoded: Decoded
    outcome: ScoreOutcome
    rows: pd.DataFrame  # what the score stage handed on: the decoded columns and the score columns
    truth: pd.DataFrame  # per row: noisy, true_label


@pytest.fixture(scope="module")
def scored(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Scored:
    """Digits with 10% flipped labels, decoded by the real Ray Data stages, scored with the default K."""
    root = tmp_path_factory.mktemp("noisy") / "images"
    write_demo_data(str(root), DemoSpec(per_class=PER_CLASS, noise=0.1, seed=3))
    config = load_config(None, [f"data.input={root}", f"output={root.parent / 'out'}", *SCORE_SETTINGS])
    decoded = decode_listing(list_images(config.data), config, keep_images=True)
    stage = ScoreStage(config, decoded.classes)
    batch = stage(decoded.batch())
    assert stage.outcome is not None
    rows = pd.DataFrame(
        {name: column for name, column in batch.items() if name not in ("pixels", "thumbnail")}
    )
    truth = pd.read_parquet(root / "_truth.parquet").set_index("path").loc[decoded.frame["path"]]
    return Scored(root, config, decoded, stage.outcome, rows, truth.reset_index())


def test_score_columns(scored: Scored) -> None:
    frame = scored.rows
    assert scored.outcome.scored == len(frame) == PER_CLASS * 10 and scored.outcome.cached == 0
    assert frame["el2n"].between(0, math.sqrt(2)).all()
    assert (frame["el2n_std"] >= 0).all() and (frame["grand"] >= 0).all()
    assert frame["forgetting"].between(0, scored.config.score.epochs).all()
    assert frame["prototype"].isna().all()  # label-free score not asked for
    assert (frame["score"] == frame["el2n"]).all()
    assert (frame["path"] == scored.decoded.frame["path"]).all()  # rows keep their order
    pd.testing.assert_frame_equal(frame[[*SCORE_COLUMNS, "score"]], scored.outcome.columns, check_names=False)
    for losses in scored.outcome.losses:  # every proxy learned something
        assert losses[-1] < 0.7 * losses[0]


def test_label_noise_ranks_high(scored: Scored) -> None:
    noisy = scored.truth["noisy"].to_numpy()
    frame = scored.rows
    auroc = {name: roc_auc_score(noisy, frame[name]) for name in ("el2n", "grand", "forgetting")}
    print(f"label-noise AUROC (K={scored.config.score.num_models}): {auroc}")
    assert auroc["el2n"] >= 0.9
    assert auroc["grand"] >= 0.85 and auroc["forgetting"] >= 0.8
    # one seed alone (the K-model run's first member) is not better than the average over K
    single = scored.config.model_copy(deep=True)
    single.score.num_models = 1
    decoded = scored.decoded
    alone = score_images(decoded.frame, decoded.images, decoded.classes, single)
    auroc_one = roc_auc_score(noisy, alone.columns["el2n"])
    print(f"label-noise AUROC with K=1: {auroc_one:.3f}")
    assert auroc["el2n"] >= auroc_one - 0.005


def test_offset_pruning_keeps_far_fewer_wrong_labels_than_random(scored: Scored) -> None:
    """Offset pruning first drops the hardest 10% (where EL2N puts the flipped labels), so the 70% it keeps
    holds far fewer of the injected wrong labels than a seeded random 70% does (which keeps about 70% of
    them): at most half as many. The margin is wide (measured: 10 against at least 30, so 5 more wrong
    labels kept would still pass), so what a CPU's float arithmetic does to single scores cannot flip it.

    Whether training on the offset-pruned 70% then gives a better model than a random 70% is a claim about
    held-out accuracy, which at this size three seeds cannot show (the margin was inside the noise, and the
    test failed on some CPUs): that claim belongs to a measured experiment with enough seeds and a
    confidence interval (`experiments/`), not to a test.
    """
    noisy = scored.truth["noisy"].to_numpy()
    kept_noise = {}
    for policy in ("offset", "random"):
        for seed in range(3):
            kept = prune(scored.rows, PruneConfig(policy=policy, keep=0.7, offset=0.1, seed=seed))["kept"]
            kept_noise[policy, seed] = int(noisy[kept.to_numpy()].sum())
    print(f"wrong labels kept of {int(noisy.sum())}: {kept_noise}")
    offset = max(kept_noise["offset", s] for s in range(3))  # measured: 10 of 46
    random = min(kept_noise["random", s] for s in range(3))  # measured: 30 to 37 of 46
    assert offset <= random / 2, kept_noise


def test_proxies_as_train_jobs_score_as_the_tasks_do(scored: Scored, tmp_path: Path) -> None:
    """`score.trainer=train` trains each proxy as a Ray Train job (checkpointed every epoch) instead of a
    task: the same training, so on CPU the very same scores, and one run per proxy kept under the score
    cache's folder for the scoring key (where a rerun over the same rows resumes them)."""
    decoded = scored.decoded
    tasks = scored.config.model_copy(deep=True)
    tasks.score.num_models, tasks.score.cache_url = 2, str(tmp_path / "cache")
    jobs = tasks.model_copy(deep=True)
    jobs.score.trainer = "train"
    by_tasks = score_images(decoded.frame, decoded.images, decoded.classes, tasks)
    by_jobs = score_images(decoded.frame, decoded.images, decoded.classes, jobs)
    pd.testing.assert_frame_equal(by_jobs.columns, by_tasks.columns)
    assert by_jobs.losses == by_tasks.losses
    (key,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    runs = sorted(p.name for p in (key / "proxy_jobs").iterdir() if p.is_dir())
    assert len(runs) == 2 and all(r.startswith("proxy-labels-") for r in runs), runs
    assert runs[0].endswith("-s0") and runs[1].endswith("-s1")
