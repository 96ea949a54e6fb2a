"""Export: `curate --export webdataset|parquet` writes the kept images as shards with their original bytes,
sha256 and scores, which the project's own shard and table readers read back to the same images and labels
(folder → webdataset → parquet round trip), locally and on a real S3 server (moto); a rerun writes the same
shards and removes the stale ones; a kept image deleted or changed since curation is skipped and counted."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import ExportConfig, load_config
from pipeline.core.results import read_result
from pipeline.core.storage import join
from pipeline.curate import CurateResult, curate
from pipeline.demo_data import DemoSpec, write_demo_data
from stages.export import INDEX_NAME, SCORE_COLUMNS, export_kept, image_extension
from stages.formats import expand_braces
from tests.tiny import TINY_CURATE, as_overrides

DATA = load_config(None, []).data


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 images per class (png and jpg) and the demo's 7 bad files, as a folder (read-only: copy to change)."""
    root = tmp_path_factory.mktemp("export") / "images"
    write_demo_data(str(root), DemoSpec(per_class=3, bad=7, seed=1))
    return root


def curate_with(input_url: str, output: str, *overrides: str) -> CurateResult:
    return curate(load_config(None, [f"data.input={input_url}", f"output={output}", *overrides]))


def classes_of(root: Path) -> str:
    return f"data.classes=[{','.join(sorted(p.name for p in root.iterdir() if p.is_dir()))}]"


def kept(result: CurateResult) -> pd.DataFrame:
    return result.manifest[result.manifest["kept"]].reset_index(drop=True)


def tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """A tar's members grouped by key (the name up to the first dot), as webdataset groups them."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return samples


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- round trip


def test_folder_to_webdataset_to_parquet_round_trip(ray_cluster: None, demo: Path, tmp_path: Path) -> None:
    """A scored, pruned curation exports its kept images as shards; curating those shards finds the same
    images and labels; their manifest (shard-member paths) exports as Parquet tables, which curate to the
    same images again."""
    named = classes_of(demo)
    settings = ["score.method=el2n", "prune.policy=keep-hard", "prune.keep=0.7", *as_overrides(TINY_CURATE)]
    first = curate_with(
        str(demo), str(tmp_path / "out"), *settings, "export.format=webdataset", "export.samples_per_shard=7"
    )
    source = kept(first)
    assert 0 < len(source) < len(first.manifest)  # pruned: only the kept rows are exported
    exported = first.export
    assert exported is not None and exported.format == "webdataset"
    assert exported.folder == join(first.run_dir, "export") and exported.skipped == 0
    assert exported.samples == len(source) and len(exported.shards) == -(-len(source) // 7)
    assert expand_braces(exported.pattern) == exported.shards  # one pattern names every shard
    folder = Path(exported.folder)
    assert shard_names(folder) == [INDEX_NAME, *(f"kept-{n:06d}.tar" for n in range(len(exported.shards)))]
    index = json.loads((folder / INDEX_NAME).read_text())
    assert index["pattern"] == exported.pattern and index["samples"] == len(source)
    assert sum(p.stat().st_size for p in folder.glob("*.tar")) == exported.bytes

    # Each sample: the original bytes under their own extension, .cls, and .json with sha256 and scores.
    by_path = source.set_index("path")
    keys = []
    for shard in exported.shards:
        for key, members in tar_samples(Path(shard).read_bytes()).items():
            keys.append(key)
            assert "." not in key and key.isdigit()
            meta = json.loads(members["json"])
            row = by_path.loc[meta["path"]]
            ext = next(e for e in ("jpg", "png") if e in members)
            assert image_extension(members[ext]) == ext
            assert hashlib.sha256(members[ext]).hexdigest() == meta["sha256"] == row["sha256"]
            assert "source_sha256" not in meta  # jpg and png are kept as they are
            assert (
                int(members["cls"]) == meta["label"] == row["label"]
                and meta["class_name"] == row["class_name"]
            )
            computed = {n: row[n] for n in SCORE_COLUMNS if pd.notna(row[n])}  # one not computed is left out
            assert "el2n" in computed and {n: meta[n] for n in SCORE_COLUMNS if n in meta} == pytest.approx(
                computed
            )
            assert len(computed) < len(SCORE_COLUMNS) and meta["score"] == pytest.approx(row["score"])
    assert keys == sorted(keys) and len(keys) == len(source)  # numbered in path order

    # Read back by the project's webdataset reader, through the brace pattern.
    wds = curate_with(exported.pattern, str(tmp_path / "out-wds"), "score.method=none", named)
    assert wds.format == "webdataset" and wds.quarantine.empty
    expected = dict(
        zip(source["sha256"], zip(source["label"], source["class_name"], strict=True), strict=True)
    )
    got = dict(zip(wds.manifest["sha256"], zip(wds.manifest["label"], wds.manifest["class_name"], strict=True), strict=True))  # fmt: skip
    assert got == expected

    # That manifest names shard members: export it as Parquet tables and read them back once more.
    tables = export_kept(
        wds.manifest, str(tmp_path / "tables"), ExportConfig(format="parquet", samples_per_shard=10), DATA
    )
    assert tables.samples == len(source) and len(tables.shards) == -(-len(source) // 10)
    table = pq.read_table(tables.shards[0])
    assert table.schema.field("image").type.names == ["bytes", "path"]  # the Hugging Face Image struct
    rows = table.to_pylist()
    assert all(hashlib.sha256(r["image"]["bytes"]).hexdigest() == r["sha256"] for r in rows)
    assert all(r["path"].split("#")[0] in exported.shards for r in rows)
    back = curate_with(str(tmp_path / "tables"), str(tmp_path / "out-pq"), "score.method=none", named)
    assert back.format == "parquet"
    got = dict(zip(back.manifest["sha256"], zip(back.manifest["label"], back.manifest["class_name"], strict=True), strict=True))  # fmt: skip
    assert got == expected


def test_other_formats_are_reencoded_losslessly_and_unlabeled_rows_have_no_cls(
    ray_cluster: None, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    files = {}
    for name, fmt in (("a.bmp", "BMP"), ("b.gif", "GIF"), ("c.webp", "WEBP"), ("d.tiff", "TIFF")):
        buffer = io.BytesIO()
        image = Image.fromarray(pixels).convert("P") if fmt == "GIF" else Image.fromarray(pixels)
        image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        (tmp_path / name).write_bytes(buffer.getvalue())
        files[str(tmp_path / name)] = buffer.getvalue()
    manifest = pd.DataFrame(
        {
            "path": list(files),
            "sha256": [hashlib.sha256(b).hexdigest() for b in files.values()],
            "label": [0, 1, -1, 2],
            "class_name": ["x", "y", "", "z"],
            "score": [0.5, None, None, None],
            "kept": True,
        }
    )
    result = export_kept(manifest, str(tmp_path / "out"), ExportConfig(format="webdataset"), DATA)
    assert result.samples == 4 and len(result.shards) == 1  # 256 MiB: one shard
    samples = tar_samples(Path(result.shards[0]).read_bytes())
    by_source = {json.loads(m["json"])["path"]: m for m in samples.values()}
    for path, original in files.items():
        members = by_source[path]
        meta = json.loads(members["json"])
        if path.endswith(".webp"):
            assert members["webp"] == original and "source_sha256" not in meta and "cls" not in members
            continue
        png = members["png"]
        assert meta["sha256"] == hashlib.sha256(png).hexdigest() != meta["source_sha256"]
        assert meta["source_sha256"] == hashlib.sha256(original).hexdigest()
        with Image.open(io.BytesIO(original)) as a, Image.open(io.BytesIO(png)) as b:
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        assert int(members["cls"]) == meta["label"]
    assert json.loads(by_source[str(tmp_path / "a.bmp")]["json"])["score"] == 0.5


# ---------------------------------------------------------------------------------------------- S3


def test_export_on_s3_from_the_command_line(ray_cluster: None, s3_bucket: str) -> None:
    images = join(s3_bucket, "images")
    write_demo_data(images, DemoSpec(per_class=2, seed=3))
    args = ["curate", "-i", images, "-o", join(s3_bucket, "cur"), "--score", "none", "--export", "parquet",
            "--set", "export.samples_per_shard=8"]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    pattern = read_result(join(s3_bucket, "cur"))["outputs"]["export"]  # type: ignore[index]
    assert "export: 20 images in 3 parquet shards" in done.output and f"shards: {pattern}\n" in done.output
    assert pattern.startswith(f"{s3_bucket}/cur/runs/") and pattern.endswith(
        "/export/kept-{000000..000002}.parquet"
    )
    fs = fsspec.filesystem("s3")
    folder = pattern.rsplit("/", 1)[0]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(folder)) == [
        INDEX_NAME, "kept-000000.parquet", "kept-000001.parquet", "kept-000002.parquet"
    ]  # fmt: skip
    source = curate_with(images, join(s3_bucket, "again"), "score.method=none")
    back = curate_with(pattern, join(s3_bucket, "back"), "score.method=none", "data.classes=[" + ",".join(
        sorted(set(source.manifest["class_name"]))) + "]")  # fmt: skip
    assert set(zip(back.manifest["sha256"], back.manifest["class_name"], strict=True)) == set(
        zip(source.manifest["sha256"], source.manifest["class_name"], strict=True)
    )
    assert back.manifest["path"].str.startswith(folder).all()


# ---------------------------------------------------------------------------------------------- reruns


def test_a_rerun_writes_the_same_shards_and_removes_stale_ones(
    ray_cluster: None, demo: Path, tmp_path: Path
) -> None:
    manifest = curate_with(str(demo), str(tmp_path / "out"), "score.method=none").manifest
    folder = tmp_path / "export"

    def export(fmt: str = "webdataset", **settings: object) -> list[str]:
        result = export_kept(
            manifest, str(folder), ExportConfig(format=fmt, **settings), DATA, max_in_flight=2
        )
        assert result.samples == len(manifest) == 30
        assert json.loads((folder / INDEX_NAME).read_text())["shards"] == [
            Path(u).name for u in result.shards
        ]
        return result.shards

    first = export(samples_per_shard=4)
    assert len(first) == 8
    before = {u: Path(u).read_bytes() for u in first}
    (folder / "kept-notes.txt").write_text("not a shard")  # other names under the folder are left alone
    (folder / "other-000009.tar").write_bytes(b"")
    assert export(samples_per_shard=4) == first
    assert {u: Path(u).read_bytes() for u in first} == before  # idempotent: the same bytes

    second = export(samples_per_shard=10)
    assert len(second) == 3  # kept-000003.tar .. kept-000007.tar are stale: a prefix listing would find them
    assert shard_names(folder) == sorted(
        [INDEX_NAME, "kept-notes.txt", "other-000009.tar", *(Path(u).name for u in second)]
    )
    third = export("parquet", samples_per_shard=10)  # the other format under the same prefix replaces them
    assert shard_names(folder) == sorted(
        [INDEX_NAME, "kept-notes.txt", "other-000009.tar", *(Path(u).name for u in third)]
    )
    assert all(u.endswith(".parquet") for u in third)


def test_shard_size_follows_shard_mib(ray_cluster: None, demo: Path, tmp_path: Path) -> None:
    manifest = curate_with(str(demo), str(tmp_path / "out"), "score.method=none").manifest
    target = 24 * 1024
    result = export_kept(manifest, str(tmp_path / "x"), ExportConfig(format="webdataset", shard_mib=target / 2**20), DATA)  # fmt: skip
    counts = [len(tar_samples(Path(u).read_bytes())) for u in result.shards]
    assert 1 < result.per_shard < 30 and counts[:-1] == [result.per_shard] * (len(counts) - 1)
    for url in result.shards[:-1]:
        assert 0.5 * target <= Path(url).stat().st_size <= target + 10240  # a tar rounds up to 10 KiB records


# ---------------------------------------------------------------------------------------------- vanished


def test_kept_images_deleted_or_changed_since_curation_are_skipped_and_counted(
    ray_cluster: None, demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    shutil.copytree(demo, root)
    result = curate_with(str(root), str(tmp_path / "out"), "score.method=none")
    paths = sorted(result.manifest["path"])
    gone, changed = Path(paths[3]), Path(paths[11])
    gone.unlink()
    changed.write_bytes((root / Path(paths[12]).relative_to(root)).read_bytes())  # another image's bytes
    with caplog.at_level(logging.WARNING, logger="stages.export"):
        exported = export_kept(
            result.manifest,
            str(tmp_path / "export"),
            ExportConfig(format="webdataset", samples_per_shard=8),
            DATA,
        )
    assert exported.skipped == 2 and exported.samples == len(paths) - 2
    assert len(exported.shards) == 4  # the numbering stays: keys and shards do not move
    warned = caplog.text
    assert (
        f"skipped {gone}: deleted since curation" in warned and f"skipped {changed}: changed since" in warned
    )
    index = json.loads((tmp_path / "export" / INDEX_NAME).read_text())
    assert index["skipped"] == 2 and {e["path"] for e in index["skipped_examples"]} == {
        str(gone),
        str(changed),
    }
    sources = [
        json.loads(m["json"])["path"]
        for u in exported.shards
        for m in tar_samples(Path(u).read_bytes()).values()
    ]
    assert sorted(sources) == [p for p in paths if p not in (str(gone), str(changed))]
    assert set(SCORE_COLUMNS).isdisjoint(json.loads(next(iter(tar_samples(Path(exported.shards[0]).read_bytes()).values()))["json"]))  # fmt: skip
