"""Read + decode + manifest through Ray Data, on a local folder and on a real S3 server (moto)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import load_config
from pipeline.curate import curate
from pipeline.demo_data import DemoSpec, write_demo_data
from stages.base import Batch, ChainStages, Stage
from stages.decode import DecodeOptions, DecodeStage
from stages.manifest import read_table
from stages.read import LabelsError, ReadBytes, list_images, read_images


def check_outcome(root: str, output: str) -> pd.DataFrame:
    """Curate `root` (score none) into `output`; check counts, labels and quarantine reasons."""
    config = load_config(None, [f"data.input={root}", f"output={output}", "score.method=none"])
    result = curate(config)
    manifest, meta = read_table(result.manifest_url)
    quarantine, _ = read_table(result.quarantine_url)
    truth = pd.read_parquet(f"{root}/_truth.parquet")
    bad = pd.read_parquet(f"{root}/_bad.parquet")
    assert sorted(manifest["path"]) == sorted(truth["path"])
    assert manifest["kept"].all() and set(manifest["reason"]) == {"kept"}
    merged = manifest.merge(truth, on="path")
    assert (merged["label"] == merged["given_label"]).all()  # labels follow the folder, noisy or not
    assert (merged["class_name"] == [p.split("/")[-2] for p in merged["path"]]).all()
    assert dict(zip(quarantine["path"], quarantine["reason"], strict=True)) == dict(
        zip(bad["path"], bad["reason"], strict=True)
    )
    assert meta["run_id"] == result.run_id and meta["classes"][0] == "digit_0"
    return manifest


def test_local_folder(ray_cluster: None, demo_folder: Path, tmp_path: Path) -> None:
    first = check_outcome(str(demo_folder), str(tmp_path / "out"))
    second = check_outcome(str(demo_folder), str(tmp_path / "out"))  # rerun: same rows
    pd.testing.assert_frame_equal(first, second)


def test_s3_bucket(ray_cluster: None, s3_bucket: str, tmp_path: Path) -> None:
    root = f"{s3_bucket}/train"
    write_demo_data(root, DemoSpec(per_class=8, noise=0.2, bad=7, seed=2))
    manifest = check_outcome(root, f"{s3_bucket}/out")
    assert manifest["path"].str.startswith(f"{s3_bucket}/train/").all()


def test_labels_table(ray_cluster: None, demo_folder: Path, tmp_path: Path) -> None:
    listing = list_images(load_config(None, [f"data.input={demo_folder}"]).data)
    table = pd.DataFrame({"path": [p.split("/images/")[1] for p in listing.paths[:5]], "label": [3] * 5})
    table.to_csv(tmp_path / "labels.csv", index=False)
    config = load_config(None, [f"data.input={demo_folder}", f"data.labels={tmp_path / 'labels.csv'}"])
    listed = list_images(config.data)
    assert len(listed) == 5 and set(listed.labels) == {3}
    table.loc[0, "path"] = "digit_0/missing.png"
    table.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(LabelsError, match="references 1 file"):
        list_images(config.data)


def test_labels_table_class_names_index_the_labels(demo_folder: Path, tmp_path: Path) -> None:
    """`classes[i]` names label i: unlabeled rows (-1) name no class, and one label with two names is an
    error, not a shifted class list."""
    listing = list_images(load_config(None, [f"data.input={demo_folder}"]).data)
    paths = [p.split("/images/")[1] for p in listing.paths[:4]]
    table = pd.DataFrame({"path": paths, "label": [-1, 0, 1, 1], "class_name": ["?", "cat", "dog", "dog"]})
    table.to_csv(tmp_path / "labels.csv", index=False)
    config = load_config(None, [f"data.input={demo_folder}", f"data.labels={tmp_path / 'labels.csv'}"])
    assert list_images(config.data).classes == ["cat", "dog"]
    table.loc[3, "class_name"] = "wolf"
    table.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(LabelsError, match="label 1 has 2 class names"):
        list_images(config.data)


def test_read_then_stages_run_in_one_call(ray_cluster: None, demo_folder: Path) -> None:
    """`read_images(..., then=...)` hands each read batch to the next stages as numpy, in the same call."""
    config = load_config(None, [f"data.input={demo_folder}", "data.read_batch_size=16"])
    listing = list_images(config.data)

    class Sizes(Stage):
        name = "sizes"
        inputs = ("path", "bytes")
        outputs = ("path", "size")
        passthrough = False

        def process(self, batch: Batch) -> Batch:
            return {"path": batch["path"], "size": np.asarray([len(b) for b in batch["bytes"]])}

    class Bigger(Stage):
        name = "bigger"
        inputs = ("size",)
        outputs = ("size",)

        def process(self, batch: Batch) -> Batch:
            assert isinstance(batch["size"], np.ndarray)  # not an Arrow column: no block in between
            return {**batch, "size": batch["size"] + 1}

    chain = ChainStages(ReadBytes(config.data.storage_options), Sizes(), Bigger())
    assert chain.name == "read → sizes → bigger"
    rows = read_images(listing, config.data, then=[Sizes(), Bigger()]).to_pandas()
    assert sorted(rows.columns) == ["path", "size"] and len(rows) == len(listing)
    for path, size in zip(rows["path"], rows["size"], strict=True):
        assert size == len(Path(path).read_bytes()) + 1


def test_read_bytes_gives_each_local_file_and_none_for_a_missing_one(tmp_path: Path) -> None:
    """Local files take their own path (no fsspec per-file wrapper): the same bytes, in the same order. A file
    deleted since listing comes back as None (decode quarantines it as `missing`), not as an empty object
    and not as an error that would end the run."""
    paths = []
    for i, content in enumerate([b"first", b"", b"third" * 1000]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(content)
        paths.append(str(path))
    out = ReadBytes({})({"path": np.asarray(paths, dtype=object)})
    assert out["bytes"].tolist() == [b"first", b"", b"third" * 1000]
    Path(paths[1]).unlink()
    out = ReadBytes({})({"path": np.asarray(paths, dtype=object)})
    assert out["bytes"].tolist() == [b"first", None, b"third" * 1000]
    decoded = DecodeStage(DecodeOptions.from_config(load_config().decode))(out)
    assert decoded["reason"].tolist() == ["not-an-image", "missing", "not-an-image"]
    assert "deleted since" in decoded["error"][1]


def test_read_bytes_takes_s3_names_with_glob_characters_literally(s3_bucket: str) -> None:
    """`[`, `*` and `?` are legal in object names; a batch read must not treat them as patterns."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    names = ["plain.png", "img[1].png", "star*.png", "what?.png", "img1.png"]
    for i, name in enumerate(names):
        fs.pipe_file(f"{s3_bucket}/odd/{name}", f"content {i}".encode())
    urls = [f"{s3_bucket}/odd/{name}" for name in names] + [f"{s3_bucket}/odd/gone[2].png"]
    out = ReadBytes({})({"path": np.asarray(urls, dtype=object)})
    assert out["bytes"].tolist() == [f"content {i}".encode() for i in range(len(names))] + [None]
