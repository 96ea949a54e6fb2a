"""Label-free scores: prototype distance (k-means) and near-duplicate groups, on real rendered images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from pipeline.core.config import load_config
from pipeline.curate import Decoded
from pipeline.demo_data import DemoSpec, write_demo_data
from stages.base import check_chain
from stages.embed import (
    DuplicateGroups,
    kmeans,
    near_duplicate_groups,
    nearest,
    prototype_scores,
    thumbnail_groups,
    thumbnails,
)
from stages.pixels import PixelChunks, StoredRows
from stages.score import ScoreOutcome, ScoreStage, score_images


def load_folder(root: Path) -> np.ndarray:
    paths = sorted(p for p in root.rglob("*") if p.suffix in (".png", ".jpg"))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def score_unlabeled(decoded: Decoded, overrides: list[str]) -> tuple[pd.DataFrame, ScoreOutcome]:
    """Run the score stage over `decoded` as curation does: (its rows without pixels, its outcome)."""
    stage = ScoreStage(load_config(None, overrides), decoded.classes)
    batch = stage(decoded.batch())
    assert stage.outcome is not None
    return pd.DataFrame({k: v for k, v in batch.items() if k not in ("pixels", "thumbnail")}), stage.outcome


def unlabeled(images: np.ndarray) -> Decoded:
    """`images` as curate's decode step hands them to scoring, without labels."""
    frame = pd.DataFrame(
        {
            "path": [f"mem://x/{i:04d}.png" for i in range(len(images))],
            "sha256": [f"{i:064x}" for i in range(len(images))],
            "label": np.full(len(images), -1, dtype=np.int64),
            "class_name": "",
        }
    )
    pixels = {"pixels": PixelChunks.from_array(images), "thumbnail": thumbnails(images)}
    return Decoded(frame=frame, quarantine=pd.DataFrame(), classes=[], pixels=pixels)


def test_prototype_distance_flags_points_far_from_every_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, size=(3, 8))
    inliers = np.concatenate([c + rng.normal(0, 0.5, size=(50, 8)) for c in centres])
    outliers = rng.normal(0, 10, size=(5, 8)) * 2
    points = np.concatenate([inliers, outliers])
    distance, centroids = prototype_scores(points, num_clusters=3, seed=0)
    assert centroids.shape == (3, 8)
    assert set(np.argsort(-distance)[:5]) == set(range(150, 155))
    again, same = prototype_scores(points, num_clusters=3, centroids=centroids)  # cached prototypes
    np.testing.assert_allclose(again, distance) and np.testing.assert_array_equal(same, centroids)


def test_near_duplicates_survive_reencoding_and_brightness(tmp_path: Path) -> None:
    write_demo_data(str(tmp_path / "d"), DemoSpec(per_class=10, seed=5, image_format="png"))
    images = load_folder(tmp_path / "d")
    n = len(images)
    buffer = io.BytesIO()
    Image.fromarray(images[1]).save(buffer, format="JPEG", quality=70)
    recoded = np.asarray(Image.open(buffer).convert("RGB"))
    brighter = np.clip(images[2].astype(int) + 25, 0, 255).astype(np.uint8)
    copies = np.stack([images[0], recoded, brighter])
    groups = near_duplicate_groups(np.concatenate([images, copies]), threshold=0.98)
    assert groups[n : n + 3].tolist() == [groups[0], groups[1], groups[2]]
    assert groups[0] == 0 and groups[1] == 1 and groups[2] == 2  # the first member names the group
    distinct = groups[:n] != np.arange(n)
    assert distinct.sum() <= 2, f"distinct renders grouped: {np.flatnonzero(distinct)}"


def test_duplicate_tiles_give_the_groups_of_one_pass() -> None:
    """Tiles smaller than the set (memory O(block²)) find the pairs that straddle tiles, chains included,
    as one all-pairs pass does."""
    rng = np.random.default_rng(3)
    thumbs = rng.normal(size=(50, 32)).astype(np.float32)
    thumbs[[17, 41]] = thumbs[3] + rng.normal(0, 0.01, size=(2, 32))  # one group across three tiles
    thumbs[49] = thumbs[48]
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True)
    one_pass = thumbnail_groups(thumbs, threshold=0.98, block=64)
    assert one_pass[[3, 17, 41]].tolist() == [3, 3, 3] and one_pass[49] == 48
    for block in (7, 16):
        np.testing.assert_array_equal(thumbnail_groups(thumbs, threshold=0.98, block=block), one_pass)


def test_near_duplicate_groups_are_stars_not_chains() -> None:
    """Each image is grouped only with an image it is itself similar to (its group's first, the one prune
    keeps): a run of look-alikes, each close to the next, is not one group. Tiles change nothing."""
    step = np.arccos(0.985)  # neighbours at cosine 0.985; two steps apart 0.94, under the threshold
    angles = np.arange(6) * step
    thumbs = np.zeros((8, 4), dtype=np.float32)
    thumbs[:6, 0], thumbs[:6, 1] = np.cos(angles), np.sin(angles)
    thumbs[6:, 2:] = np.eye(2)  # two unrelated images
    for block in (1, 4, 64):
        groups = thumbnail_groups(thumbs, threshold=0.98, block=block)
        assert groups.tolist() == [0, 0, 2, 2, 4, 4, 6, 7], block
    sims = thumbs @ thumbs.T
    assert all(sims[i, g] >= 0.98 for i, g in enumerate(groups))


def test_duplicates_read_from_the_object_store_match_the_array(ray_cluster: None) -> None:
    """Thumbnails kept in the object store in pieces (as curation keeps them, off the driver) and read a
    tile at a time give the groups of the array in memory, tiles straddling the pieces."""
    rng = np.random.default_rng(4)
    thumbs = rng.normal(size=(40, 32)).astype(np.float32)
    thumbs[[9, 33]] = thumbs[2]
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True)
    stored = StoredRows.from_array(thumbs, piece_rows=6)
    expected = thumbnail_groups(thumbs, threshold=0.98)
    assert expected[[2, 9, 33]].tolist() == [2, 2, 2]
    np.testing.assert_array_equal(thumbnail_groups(stored, threshold=0.98, block=16), expected)
    stage = DuplicateGroups(0.98)
    groups = stage({"path": np.arange(40).astype(str).astype(object), "thumbnail": stored})["duplicate_group"]
    np.testing.assert_array_equal(groups, expected)


def test_torch_kmeans_finds_what_scikit_learn_finds() -> None:
    """The batched torch k-means (it runs on a GPU with score.use_gpu) reaches scikit-learn's inertia on
    blobs, and repeats with its seed."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(1)
    points = np.concatenate([c + rng.normal(0, 1.0, size=(200, 16)) for c in rng.normal(0, 6, size=(8, 16))])
    x = torch.from_numpy(points)
    ours = kmeans(x, 8, seed=0)
    inertia = float(nearest(x, ours)[0].sum())
    theirs = KMeans(n_clusters=8, n_init=4, random_state=0).fit(points).inertia_
    assert inertia <= theirs * 1.01
    assert torch.equal(kmeans(x, 8, seed=0), ours)
    d2, index = nearest(x, ours, block=100)  # blocks give the same answer as one pass
    d2_all, index_all = nearest(x, ours)
    torch.testing.assert_close(d2, d2_all) and torch.testing.assert_close(index, index_all)


def test_label_free_prototype_scores_flag_foreign_images(ray_cluster: None, tmp_path: Path) -> None:
    """Unlabeled digits plus a few shapes: the shapes sit far from every digit prototype."""
    write_demo_data(str(tmp_path / "digits"), DemoSpec(per_class=15, seed=6))
    write_demo_data(str(tmp_path / "shapes"), DemoSpec(sources=("shapes",), per_class=1, seed=7))
    digits, shapes = load_folder(tmp_path / "digits"), load_folder(tmp_path / "shapes")
    images = np.concatenate([digits, shapes])
    foreign = np.r_[np.zeros(len(digits), bool), np.ones(len(shapes), bool)]
    decoded = unlabeled(images)
    overrides = [
        "score.method=prototype",
        "score.num_models=2",
        "score.epochs=6",
        "score.num_clusters=4",
        "score.cache=false",
        f"output={tmp_path / 'out'}",
    ]
    out, _ = score_unlabeled(decoded, overrides)
    assert out["el2n"].isna().all() and (out["score"] == out["prototype"]).all()
    auroc = roc_auc_score(foreign, out["prototype"])
    print(f"foreign-image AUROC of the label-free prototype score: {auroc:.3f}")
    assert auroc >= 0.8
    labeled = load_config(None, ["score.method=el2n", "score.cache=false"])
    with pytest.raises(ValueError, match="needs labels"):
        score_images(decoded.frame, decoded.images, decoded.classes, labeled)


def test_prototype_embeddings_from_a_maskdiet_encoder(tmp_path: Path) -> None:
    """`score.encoder` = an MAE `encoder.pth`: unit-norm embeddings, one per image, same input → same output."""
    from pipeline.models.checkpoint import export_encoder
    from pipeline.models.mae import build_mae
    from stages.embed import encoder_embeddings

    torch.manual_seed(0)
    url = export_encoder(build_mae("mae_vit_micro_patch4", img_size=32), str(tmp_path / "encoder.pth"))
    write_demo_data(str(tmp_path / "d"), DemoSpec(per_class=3, seed=8, image_format="png"))
    images = load_folder(tmp_path / "d")
    embedding = encoder_embeddings(url, images)
    assert embedding.shape == (len(images), 64)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(encoder_embeddings(url, images[:5]), embedding[:5], rtol=1e-4, atol=1e-5)
    distance, _ = prototype_scores(embedding, num_clusters=3)
    assert distance.shape == (len(images),) and (distance >= 0).all()


def test_prototype_scores_with_an_encoder_train_no_proxies(tmp_path: Path) -> None:
    """With `score.encoder`, the prototype distances come from its embeddings alone: no rotation proxy is
    trained (they would cost K trainings and add nothing to the scores)."""
    from pipeline.models.checkpoint import export_encoder
    from pipeline.models.mae import build_mae

    torch.manual_seed(0)
    url = export_encoder(build_mae("mae_vit_micro_patch4", img_size=32), str(tmp_path / "encoder.pth"))
    write_demo_data(str(tmp_path / "d"), DemoSpec(per_class=3, seed=8, image_format="png"))
    images = load_folder(tmp_path / "d")
    decoded = unlabeled(images)
    overrides = [
        "score.method=prototype",
        f"score.encoder={url}",
        "score.num_clusters=3",
        "score.cache=false",
    ]
    out, outcome = score_unlabeled(decoded, overrides)
    assert outcome.losses == [] and outcome.scored == len(images)
    assert np.isfinite(out["prototype"]).all() and (out["score"] == out["prototype"]).all()


def test_duplicate_stage_adds_the_groups() -> None:
    """All-to-all (every image is compared with every other); needs the thumbnails (made where the pixels
    are), keeps the other columns."""
    stage = DuplicateGroups(threshold=0.98)
    assert stage.kind == "all-to-all"
    assert check_chain([stage], ("path", "thumbnail")) == {"path", "thumbnail", "duplicate_group"}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    images[3] = images[1]
    out = stage({"path": np.asarray(list("abcd"), dtype=object), "thumbnail": thumbnails(images)})
    assert out["duplicate_group"].tolist() == [0, 1, 2, 1] and out["path"].tolist() == list("abcd")
