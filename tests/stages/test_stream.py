"""Stream stage: manifest on S3 (moto) → streamed, decoded training images (augmented later, on the training
device: tests/pipeline/models/test_augment.py); the decoded cache; the validation split."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.config import Config, load_config
from pipeline.core.storage import join
from pipeline.demo_data import DemoSpec, write_demo_data
from stages.manifest import write_manifest
from stages.read import list_images
from stages.stream import (
    TrainingImages,
    epoch_listing,
    load_images,
    load_kept,
    split_validation,
    training_dataset,
)


@pytest.fixture
def s3_manifest(s3_bucket: str) -> tuple[str, Config, int]:
    """Demo images on S3 and a manifest that keeps two thirds of them; returns (url, config, kept)."""
    images = join(s3_bucket, "images")
    write_demo_data(images, DemoSpec(per_class=3, seed=5))
    config = load_config(overrides=[f"data.input={images}", "decode.image_size=32", "data.read_batch_size=8"])
    frame = list_images(config.data).frame()
    frame["sha256"] = ""
    frame["kept"] = np.arange(len(frame)) % 3 != 0
    frame["reason"] = np.where(frame["kept"], "kept", "pruned:easy")
    url = join(s3_bucket, "curated", "manifest.parquet")
    write_manifest(url, frame, {"run_id": "test"})
    return url, config, int(frame["kept"].sum())


def _digests(ds) -> list[str]:
    out = []
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        out += [hashlib.sha256(img.tobytes()).hexdigest() for img in batch["image"]]
    return sorted(out)


def test_manifest_streams_decoded_images_from_s3(ray_cluster, s3_manifest) -> None:
    url, config, kept = s3_manifest
    frame = load_kept(url)
    assert len(frame) == kept and frame["kept"].all()
    train, val = split_validation(frame, 4, seed=0)
    assert len(val) == 4 and not set(val["path"]) & set(train["path"])

    ds = training_dataset(train, config, epochs=2, seed=7)
    batches = list(ds.iter_batches(batch_size=8, batch_format="numpy"))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.shape == (2 * len(train), 32, 32, 3) and images.dtype == np.uint8
    assert set(batches[0]) == {"image", "label"}  # only tensor columns reach the trainer
    assert set(labels) <= set(train["label"])

    # The CPUs only decode: every epoch holds each training image once, as decoded (no crop, no flip).
    plain = load_images(train["path"].tolist(), config)
    plain_digests = sorted(hashlib.sha256(img.tobytes()).hexdigest() for img in plain)
    assert _digests(ds) == sorted(plain_digests * 2)
    # Each epoch in its own seeded order: the same for a seed, another for another seed.
    listing = epoch_listing(train, 2, seed=7)
    assert sorted(listing.paths[: len(train)]) == sorted(listing.paths[len(train) :]) == sorted(train["path"])
    assert listing.paths == epoch_listing(train, 2, seed=7).paths != epoch_listing(train, 2, seed=8).paths


def _digest_pairs(batches) -> list[tuple[str, int]]:
    return [
        (hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest(), int(y))
        for b in batches
        for img, y in zip(np.asarray(b["image"]), np.asarray(b["label"]), strict=True)
    ]


def test_decoded_cache_gives_the_streamed_images_and_drops_what_no_longer_decodes(
    ray_cluster, s3_manifest, caplog, monkeypatch
) -> None:
    import fsspec
    import ray

    from stages import stream
    from stages.stream import cached_batches, decode_cache, fits_cache

    url, config, _ = s3_manifest
    train, _ = split_validation(load_kept(url), 4, seed=0)
    config.pretrain.augment = False
    config.pretrain.batch_size = 4
    assert fits_cache(len(train), config)
    assert not fits_cache(
        len(train),
        config.model_copy(update={"pretrain": config.pretrain.model_copy(update={"cache_decoded_mib": 0})}),
    )
    cache = decode_cache(train, config)
    assert len(cache.frame) == len(train)
    with monkeypatch.context() as m:  # a set too large to decode in this process: one Ray Data pass
        m.setattr(stream, "DECODE_HERE_MAX", 0)
        by_ray_data = decode_cache(train, config)
    assert by_ray_data.frame.equals(cache.frame)
    assert np.array_equal(ray.get(by_ray_data.images), ray.get(cache.images))

    # The same images and labels as the stream, each once per epoch (the tail short of a batch dropped).
    streamed = sorted(
        _digest_pairs(training_dataset(train, config, epochs=2, seed=3).iter_batches(batch_size=8))
    )
    one = _digest_pairs(cached_batches(cache, config, epochs=2, seed=3))
    assert len(one) == (2 * len(train)) // 4 * 4 and set(one) <= set(streamed)
    assert sorted(one[: len(train)]) == sorted(set(streamed))  # the first epoch: every image once
    # Two workers split each global batch: disjoint halves, together one worker's sequence of rows.
    ranks = [_digest_pairs(cached_batches(cache, config, epochs=2, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(one[: 2 * len(ranks[0])])
    # A resumed run goes on from the batch after its checkpoint's (counted round the whole sequence).
    assert _digest_pairs(cached_batches(cache, config, epochs=2, seed=3, start=2)) == one[2 * 4 :]
    batches_in_all = len(one) // 4
    assert _digest_pairs(cached_batches(cache, config, epochs=2, seed=3, start=batches_in_all + 1)) == one[4:]
    # `prepare` runs on each batch in the prefetch thread (the trainer pins it and starts its copy to the
    # GPU there), a few batches ahead; the batches are the same.
    seen: list[int] = []

    def prepare(batch: dict) -> dict:
        seen.append(len(batch["image"]))
        return {"image": torch.from_numpy(batch["image"]), "label": batch["label"]}

    stream_of = cached_batches(cache, config, epochs=2, seed=3, prepare=prepare, prefetch=3)
    first = next(stream_of)
    assert isinstance(first["image"], torch.Tensor) and len(seen) >= 1
    assert _digest_pairs([first, *stream_of]) == one and len(seen) == len(one) // 4

    here_max = stream.DECODE_HERE_MAX

    def cached_both_ways() -> list[tuple[pd.DataFrame, str]]:
        """decode_cache in this process and through Ray Data: (its frame, the warnings) for each."""
        out = []
        for limit in (here_max, 0):
            monkeypatch.setattr(stream, "DECODE_HERE_MAX", limit)
            caplog.clear()
            with caplog.at_level("WARNING", logger="stages.stream"):
                out.append((decode_cache(train, config).frame, caplog.text))
        return out

    # An object overwritten since curation is left out, with a warning naming it.
    broken = str(train["path"].iloc[0])
    with fsspec.open(broken, "wb") as f:
        f.write(b"not an image any more")
    for frame, text in cached_both_ways():
        assert len(frame) == len(train) - 1 and broken not in set(frame["path"])
        assert "1 training image(s) no longer decode" in text and broken in text
        assert "not-an-image" in text
    # The stream from storage leaves it out as well.
    streamed_now = _digest_pairs(training_dataset(train, config, epochs=1, seed=3).iter_batches(batch_size=8))
    assert len(streamed_now) == len(train) - 1
    # An object deleted since curation is left out too (`missing`), by both paths: the run goes on.
    gone = str(train["path"].iloc[1])
    fsspec.filesystem("s3").rm_file(gone)
    for frame, text in cached_both_ways():
        assert len(frame) == len(train) - 2 and gone not in set(frame["path"])
        assert "2 training image(s) no longer decode" in text and "missing 1" in text
    streamed_now = _digest_pairs(training_dataset(train, config, epochs=1, seed=3).iter_batches(batch_size=8))
    assert len(streamed_now) == len(train) - 2


def test_validation_split_is_stable_and_seeded() -> None:
    import pandas as pd

    frame = pd.DataFrame({"path": [f"s3://b/x/{i:04d}.png" for i in range(200)], "label": 0})
    train, val = split_validation(frame, 20, seed=0)
    assert len(val) == 20 and len(train) == 180
    again = split_validation(frame, 20, seed=0)[1]
    assert list(val["path"]) == list(again["path"])
    # Growing the manifest only adds to the candidate pool: previously held-out rows beyond the new
    # smallest hashes may move, but the choice depends on paths, not on row order.
    shuffled = frame.sample(frac=1.0, random_state=1)
    assert set(split_validation(shuffled, 20, seed=0)[1]["path"]) == set(val["path"])
    assert set(split_validation(frame, 20, seed=1)[1]["path"]) != set(val["path"])
    assert len(split_validation(frame.head(10), 20, seed=0)[1]) == 5  # at most half


def test_training_images_stage_keeps_decoded_rows_untouched() -> None:
    """The stage before the trainer: rows that decoded, only `image` and `label`, pixels as decoded (at
    the model's side; resized only when the decoder gave another)."""
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    batch = {"path": np.array(["a", "b", "c"], dtype=object), "image": images, "ok": [True, False, True]}
    out = TrainingImages(32)({**batch, "label": np.array([1, 2, 3])})
    assert set(out) == {"image", "label"} and out["label"].tolist() == [1, 3]
    assert np.array_equal(out["image"], images[[0, 2]])
    smaller = TrainingImages(16)({**batch, "label": np.array([1, 2, 3])})["image"]
    assert smaller.shape == (2, 16, 16, 3) and smaller.dtype == np.uint8
