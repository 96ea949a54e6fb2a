"""Score cache: keys, shards, and `maskdiet curate --score el2n` end to end on a real S3 server (moto)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import s3fs
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import load_config
from pipeline.curate import curate
from pipeline.demo_data import DemoSpec, write_demo_data
from stages import manifest, score_cache
from stages.manifest import read_table
from stages.score_cache import CacheHits, ScoreCache, scoring_key

FAST = ["--set", "score.num_models=2", "--set", "score.epochs=3"]


def rows(shas: list[str], labels: list[int], value: float) -> pd.DataFrame:
    n = len(shas)
    return pd.DataFrame(
        {
            "sha256": shas,
            "label": labels,
            "el2n": [value] * n,
            "el2n_std": [0.0] * n,
            "grand": [value] * n,
            "forgetting": [1.0] * n,
            "prototype": [np.nan] * n,
        }
    )


def test_key_follows_what_changes_scores() -> None:
    base = load_config(None, [])
    key = scoring_key(base, ["a", "b"], "labels")
    assert key == scoring_key(
        load_config(None, ["score.actors=3", "score.method=grand", "score.compute=actors"]),
        ["a", "b"],
        "labels",
    )
    assert key != scoring_key(load_config(None, ["score.epochs=3"]), ["a", "b"], "labels")
    assert key != scoring_key(load_config(None, ["decode.image_size=64"]), ["a", "b"], "labels")
    assert key != scoring_key(base, ["a", "c"], "labels")
    assert key != scoring_key(base, ["a", "b"], "rotation")


def as_frame(hits: CacheHits) -> pd.DataFrame:
    """A lookup's result as one frame: `found` and the score columns, row for row with the query."""
    return pd.DataFrame({"found": hits.found, **hits.scores})


def test_lookup_matches_sha_and_label_and_compacts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(score_cache, "MAX_SHARDS", 3)
    cache = ScoreCache(str(tmp_path / "cache"), "k")
    assert not cache.lookup(["x"], np.array([0])).found.any() and cache.load_models() is None
    cache.store(rows(["a", "b"], [0, 1], 0.5))
    hits = cache.lookup(["a", "b", "c"], np.array([0, 2, 0]))  # b was relabelled: a miss
    assert hits.found.tolist() == [True, False, False]
    np.testing.assert_array_equal(hits.scores["el2n"], [0.5, np.nan, np.nan])
    for i in range(4):
        cache.store(rows([f"n{i}"], [0], 0.1 * i))
    cache.store(rows(["a"], [0], 0.9))  # a newer score replaces the old one
    assert len(cache._shards()) <= 3  # compacted
    everything = cache.read_all().set_index("sha256")
    assert len(everything) == 6 and everything.loc["a", "el2n"] == 0.9
    assert cache.lookup(["a"], np.array([0])).scores["el2n"].tolist() == [0.9]


def test_lookup_streams_row_groups_and_keeps_the_latest_row(tmp_path: Path, monkeypatch) -> None:
    """`lookup` reads the cache a row group at a time; it must find what a merge of `read_all` onto the
    query does: for each query row, in its order, the latest cached row of its (sha256, label) pair, or
    nothing, whatever the groups (a repeated query row gets the hit each time)."""
    monkeypatch.setattr(score_cache, "MAX_SHARDS", 100)
    monkeypatch.setattr(manifest, "ROW_GROUP_ROWS", 3)  # several row groups per shard
    cache = ScoreCache(str(tmp_path / "cache"), "k")
    empty = cache.lookup(["a"], np.array([0]))
    assert empty.found.tolist() == [False] and set(empty.scores) == set(score_cache.SCORES)
    assert all(np.isnan(column).all() for column in empty.scores.values())
    cache.store(rows(["a", "b", "c", "a", "d/1", "d", "e", "f"], [0, 0, 0, 0, 2, 1, 0, 0], 0.1))
    cache.store(rows(["x", "b", "y"], [0, 0, 0], 0.2))  # b's newer score, in another shard
    # c under a second label thrice, twice in one row group; h twice in one group
    cache.store(rows(["c", "c", "z", "c", "h", "h"], [1, 1, 0, 1, 0, 0], 0).assign(el2n=[1, 2, 0, 3, 4, 5]))
    cache.store(rows(["g"], [0], 0.4).assign(prototype=0.7))
    stored = cache.read_all()
    assert len(cache._shards()) == 4 and len(stored) == 13

    shas = ["c", "a", "zz", "b", "c", "d", "d/1", "e", "a", "c", "g", "f", "h"]
    labels = np.array([1, 0, 0, 0, 0, 2, 2, 1, 0, 1, 0, 0, 0])  # e relabelled; d and d/1 under d/1's label
    hits = cache.lookup(pd.Series(shas, dtype="str"), labels)
    query = pd.DataFrame({"sha256": pd.Series(shas, dtype="str"), "label": labels})
    merged = query.merge(stored, on=["sha256", "label"], how="left", indicator=True)  # the old way
    expected = merged.assign(found=merged["_merge"] == "both")[["found", *score_cache.SCORES]]
    pd.testing.assert_frame_equal(as_frame(hits), expected)
    # each query row's last score, or NaN
    assert hits.found.tolist() == [
        True,
        True,
        False,
        True,
        True,
        False,
        True,
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    np.testing.assert_array_equal(
        hits.scores["el2n"], [3.0, 0.1, np.nan, 0.2, 0.1, np.nan, 0.1, np.nan, 0.1, 3.0, 0.4, 0.1, 5.0]
    )
    assert np.isnan(hits.scores["prototype"][:10]).all() and hits.scores["prototype"][10] == 0.7
    none = cache.lookup(np.array([], dtype=object), np.array([], dtype=np.int64))
    assert len(none.found) == 0 and all(len(column) == 0 for column in none.scores.values())


def add_images(bucket: str, count: int) -> None:
    """Put `count` new digit images into the existing class folders of `bucket`/train."""
    write_demo_data(f"{bucket}/extra", DemoSpec(per_class=count // 10, seed=9, image_format="png"))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = bucket.removeprefix("s3://")
    for path in fs.find(f"{root}/extra"):
        if path.endswith(".png"):
            folder, name = path.split("/")[-2:]
            fs.copy(path, f"{root}/train/{folder}/extra_{name}")
    fs.rm(f"{root}/extra", recursive=True)


@pytest.mark.slow
def test_curate_scores_only_cache_misses_on_s3(ray_cluster: None, s3_bucket: str) -> None:
    root, out = f"{s3_bucket}/train", f"{s3_bucket}/curated"
    write_demo_data(root, DemoSpec(per_class=12, noise=0.1, bad=3, seed=4))
    first = CliRunner().invoke(
        app,
        ["curate", "-i", root, "-o", out, "--score", "el2n", "--policy", "offset", "--keep", "0.7", *FAST],
    )
    assert first.exit_code == 0, first.output
    assert "el2n score per class" in first.stderr and "digit_9" in first.stderr
    manifest, meta = read_table(f"{out}/manifest.parquet")
    assert len(manifest) == 120 and meta["config"]["score"]["method"] == "el2n"
    assert manifest["el2n"].between(0, math.sqrt(2)).all() and (manifest["score"] == manifest["el2n"]).all()
    duplicates = int((manifest["reason"] == "pruned:duplicate").sum())
    assert int(manifest["kept"].sum()) == min(84, 120 - duplicates)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    cached_models = fs.glob(f"{out.removeprefix('s3://')}/score_cache/*/models.pt")
    assert len(cached_models) == 1  # the default cache location: <output>/score_cache/<key>/

    config = load_config(
        None,
        [f"data.input={root}", f"output={out}", "score.num_models=2", "score.epochs=3", "prune.keep=0.7"],
    )
    second = curate(config)
    assert second.counts["scored"] == 0 and second.counts["cached"] == 120
    pd.testing.assert_series_equal(
        second.manifest.set_index("path")["el2n"], manifest.set_index("path")["el2n"], check_exact=False
    )

    add_images(s3_bucket, 20)
    third = curate(config)
    assert third.counts["scored"] == 20 and third.counts["cached"] == 120
    fresh = third.manifest[third.manifest["path"].str.contains("/extra_")]
    assert len(fresh) == 20 and fresh["el2n"].between(0, math.sqrt(2)).all()
    assert fresh["forgetting"].isna().all()  # never seen in proxy training: no forgetting count


def test_keys_bucket_by_their_first_hex_digit() -> None:
    """The lookup matches a bucket at a time; every key has one bucket, whatever its characters."""
    keys = pa.array(["0f", "9", "a1", "F2", "xyz", "", None, "e"], pa.large_string())
    buckets = score_cache._buckets(keys)
    assert buckets.tolist() == [0, 9, 10, 15, 16, 16, 16, 14]
    rows = score_cache._rows_by_bucket(buckets)
    assert len(rows) == score_cache.BUCKETS and sorted(np.concatenate(rows).tolist()) == list(range(8))
    assert rows[16].tolist() == [4, 5, 6]
