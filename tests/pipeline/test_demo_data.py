"""demo-data's Fashion-MNIST source: our IDX reader, the image folder written from the files (official split,
label noise with its truth, `per_class`), and the one-line error when the Debian package is missing.

The tests write tiny IDX files themselves (gzip, as the package ships them): nothing here needs the package."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.errors import UserInputError
from pipeline.demo_data import (
    FASHION_CLASSES,
    FASHION_DIR_ENV,
    FASHION_FILES,
    DemoSpec,
    load_fashion_mnist,
    read_idx,
    write_demo_data,
)

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray, compress: bool = True) -> bytes:
    """`array` as an IDX file: 0x0000, type code, ndim, big-endian uint32 dims, big-endian values."""
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    return gzip.compress(data) if compress else data


def write_fashion_files(folder: Path, per_class: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny Fashion-MNIST look-alikes: per split, `n` images of each class, class c's pixels all near
    20·c so a written file can be traced to its class; rows interleaved as in the real files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in per_class.items():
        labels = np.tile(np.arange(10, dtype=np.uint8), n)
        images = (labels[:, None, None] * 20 + rng.integers(0, 5, (len(labels), 28, 28))).astype(np.uint8)
        images_name, labels_name = FASHION_FILES[split]
        (folder / f"{images_name}.gz").write_bytes(idx_bytes(images))
        (folder / f"{labels_name}.gz").write_bytes(idx_bytes(labels))
        out[split] = images
    return out


def test_read_idx_round_trips_gzip_and_plain() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(idx_bytes(images)), images)
    assert np.array_equal(read_idx(idx_bytes(images, compress=False)), images)
    wide = np.array([[1, -2], [70000, 3]], dtype=np.int32)  # big-endian on disk, native after reading
    assert np.array_equal(read_idx(idx_bytes(wide)), wide) and read_idx(idx_bytes(wide)).dtype.isnative
    assert read_idx(idx_bytes(np.array([0.5, 2.0], dtype=np.float32))).tolist() == [0.5, 2.0]


def test_read_idx_refuses_what_is_not_idx() -> None:
    with pytest.raises(UserInputError, match="not an IDX file"):
        read_idx(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(UserInputError, match="needs 24"):
        read_idx(idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8), compress=False)[:-1])


def test_fashion_writes_real_images_per_class_with_the_split_kept_apart(tmp_path: Path) -> None:
    source = write_fashion_files(tmp_path / "idx", {"train": 3, "test": 2})
    out = tmp_path / "train"
    result = write_demo_data(
        str(out),
        DemoSpec(sources=("fashion",), per_class=2, image_format="png", fashion_dir=str(tmp_path / "idx")),
    )
    assert result.classes == sorted(FASHION_CLASSES) and result.images == 20 and result.noisy == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(FASHION_CLASSES)
    files = sorted((out / "Trouser").iterdir())
    # the first two Trousers (label 1) in the file's order: rows 1 and 11, named after their row
    assert [f.name for f in files] == ["Trouser_00001.png", "Trouser_00011.png"]
    with Image.open(files[1]) as image:
        assert image.size == (28, 28) and np.array_equal(np.asarray(image), source["train"][11])
    truth = pd.read_parquet(out / "_truth.parquet")
    assert len(truth) == 20 and set(truth["true_class"]) == set(FASHION_CLASSES)

    test = tmp_path / "test"
    write_demo_data(
        str(test),
        DemoSpec(sources=("fashion",), per_class=5, split="test", size=32, fashion_dir=str(tmp_path / "idx")),
    )
    written = sorted(p for p in test.rglob("*") if p.is_file() and not p.name.startswith("_"))
    assert len(written) == 20  # the test split holds 2 a class: per_class is a cap
    with Image.open(written[0]) as image:
        assert image.size == (32, 32)


def test_fashion_noise_moves_files_and_evaluation_reads_the_truth(tmp_path: Path) -> None:
    from pipeline.core.config import load_config
    from pipeline.evaluate import load_labeled

    write_fashion_files(tmp_path / "idx", {"train": 4})
    out = tmp_path / "noisy"
    spec = DemoSpec(sources=("fashion",), per_class=4, noise=0.4, seed=3, fashion_dir=str(tmp_path / "idx"))
    result = write_demo_data(str(out), spec)
    truth = pd.read_parquet(out / "_truth.parquet").sort_values("path")
    assert result.noisy == int(truth["noisy"].sum()) > 5
    wrong = truth[truth["noisy"]]
    assert all(Path(p).parent.name != c for p, c in zip(wrong["path"], wrong["true_class"], strict=True))
    _, labels = load_labeled(str(out), load_config(), 28)
    assert labels.tolist() == truth["true_label"].tolist()  # the true classes, not the folders


def test_missing_fashion_files_name_the_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserInputError) as caught:
        load_fashion_mnist("train", str(tmp_path / "absent"))
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message
    assert not (tmp_path / "out").exists()

    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setenv(FASHION_DIR_ENV, str(tmp_path / "absent"))
    out = CliRunner().invoke(app, ["demo-data", str(tmp_path / "out"), "--classes", "fashion"])
    assert out.exit_code == 2 and "apt-get install dataset-fashion-mnist" in out.output
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_fashion_stands_alone_and_only_it_has_a_test_split() -> None:
    with pytest.raises(UserInputError, match="does not mix"):
        DemoSpec(sources=("fashion", "digits"))
    with pytest.raises(UserInputError, match="needs --classes fashion"):
        DemoSpec(sources=("digits",), split="test")
    with pytest.raises(UserInputError, match="train or test"):
        DemoSpec(sources=("fashion",), split="val")
