"""stages/pixels.py: decoded pixels in the object store, laid out in path order whatever the order in
which the decoded batches arrived; the windows a proxy streams cover every row once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import ScoreConfig
from pipeline.core.errors import UserInputError
from stages.base import check_chain
from stages.embed import thumbnails
from stages.pixels import ChunkWindows, PixelChunks, PixelStore
from stages.score import gpus_per_model


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def _stored(images: np.ndarray, paths: np.ndarray, batches: list[np.ndarray], chunk_rows: int) -> dict:
    """Feed `PixelStore` the rows of each index array in `batches` (with one bad row each), then cut."""
    store = PixelStore(image_size=8, chunk_rows=chunk_rows)
    for index in batches:
        ok = np.ones(len(index) + 1, dtype=bool)
        ok[-1] = False  # a row that did not decode: never stored
        store.add(
            {
                "path": np.append(paths[index], "bad"),
                "ok": ok,
                "image": np.concatenate([images[index], np.zeros((1, 8, 8, 3), np.uint8)]),
            }
        )
    return store({"path": np.sort(paths)})


def test_chunks_follow_path_order_whatever_the_arrival(ray_cluster: None) -> None:
    images = _images(50)
    paths = np.asarray([f"c/{i:03d}.png" for i in range(50)], dtype=object)
    rng = np.random.default_rng(1)
    shuffled = np.array_split(rng.permutation(50), 7)  # batches in no order, rows in no order
    in_order = np.array_split(np.arange(50), 3)
    a = _stored(images, paths, shuffled, chunk_rows=16)
    b = _stored(images, paths, in_order, chunk_rows=16)
    assert a["pixels"].starts.tolist() == [0, 16, 32, 48, 50] and len(a["pixels"]) == 50
    assert np.array_equal(a["pixels"].take(np.arange(50)), images)  # row i is path i, however it arrived
    for c in range(a["pixels"].chunk_count):
        assert np.array_equal(a["pixels"].chunk_rows(c), b["pixels"].chunk_rows(c))  # the same layout
    assert a["thumbnail"].shape == (50, 256)  # kept in the object store, row for row with the paths
    np.testing.assert_allclose(a["thumbnail"].to_numpy(), thumbnails(images), rtol=1e-6)
    np.testing.assert_allclose(a["thumbnail"].take(np.asarray([7, 0])), thumbnails(images[[7, 0]]), rtol=1e-6)
    assert a["path"].tolist() == sorted(paths)  # the rows pass through


def test_store_contract_and_no_rows(ray_cluster: None) -> None:
    store = PixelStore(image_size=8, chunk_rows=4)
    assert store.kind == "all-to-all"
    assert check_chain([store], ("path",)) == {"path", "pixels", "thumbnail"}
    out = store({"path": np.asarray([], dtype=object)})
    assert len(out["pixels"]) == 0 and out["thumbnail"].shape == (0, 256)


def test_take_and_iter_rows(ray_cluster: None) -> None:
    images = _images(30, seed=2)
    pixels = PixelChunks.from_array(images, chunk_rows=7)
    rows = np.asarray([29, 0, 8, 7, 13, 6])
    assert np.array_equal(pixels.take(rows), images[rows])
    seen = list(pixels.iter_rows(rows))
    assert sorted(np.concatenate([r for r, _ in seen]).tolist()) == sorted(rows.tolist())
    for r, got in seen:
        assert np.array_equal(got, images[r])
        assert len(set(pixels.source_of(r).tolist())) == 1  # one stored batch per piece
        assert r.tolist() == [x for x in rows.tolist() if x in set(r.tolist())]  # the given order kept
    by_source = pixels.by_source(rows)
    assert sorted(by_source.tolist()) == sorted(rows.tolist())
    assert np.all(np.diff(pixels.source_of(by_source)) >= 0)


def test_windows_cover_every_row_once_and_repeat_with_the_seed(ray_cluster: None) -> None:
    images = _images(40, seed=3)
    windows = ChunkWindows(PixelChunks.from_array(images, chunk_rows=6), chunks_per_window=3)
    assert len(windows) == 40

    def one_pass(seed: int | None) -> list[np.ndarray]:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        out = []
        for rows, got in windows.windows(generator):
            assert np.array_equal(got, images[rows])  # rows and pixels stay paired through the shuffle
            assert len(rows) <= 3 * 6  # never more than a window at once
            out.append(rows)
        return out

    ordered = one_pass(None)
    assert sorted(np.concatenate(ordered).tolist()) == list(range(40))
    first, again, other = one_pass(0), one_pass(0), one_pass(1)
    assert sorted(np.concatenate(first).tolist()) == list(range(40))
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))


def test_gpu_scoring_on_a_cluster_without_gpus_fails_clearly(ray_cluster: None) -> None:
    assert gpus_per_model(ScoreConfig()) == 0.0  # CPU: the scorers and proxy tasks ask for no GPU
    with pytest.raises(UserInputError, match=r"score\.use_gpu=false"):
        gpus_per_model(ScoreConfig(use_gpu=True, gpus_per_model=0.25))


def test_chunks_mix_the_classes(ray_cluster: None) -> None:
    """Rows sorted by path are sorted by class folder; dealt into chunks by the fixed permutation, every
    chunk holds most classes, so a proxy shuffling a window of a few chunks still sees every class."""
    labels = np.repeat(np.arange(10), 50)  # 10 class folders of 50, in path order
    pixels = PixelChunks.from_array(_images(500, seed=4), chunk_rows=50)
    for c in range(pixels.chunk_count):
        assert len(set(labels[pixels.chunk_rows(c)].tolist())) >= 7
