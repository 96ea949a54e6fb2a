"""Input formats: WebDataset shards (written with tarfile, webdataset's conventions) and Parquet image tables
(written with pyarrow) curate to the same images as a folder of the same files, locally and on a real S3
server (moto); bad samples inside shards are quarantined with their key; an incremental curate over a
grown shard set scores only the new samples; the training stream reads each container once per pass."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import load_config
from pipeline.core.storage import join
from pipeline.curate import CurateResult, curate
from pipeline.demo_data import DemoSpec, write_demo_data
from stages import read as read_module
from stages import read_parquet
from stages.formats import (
    FormatError,
    LabelOptions,
    check_input,
    detect_format,
    expand_braces,
    find_inputs,
    finish_labels,
    split_member,
)
from stages.read import ReadBytes, grouped_blocks, list_source, member_groups
from stages.read_parquet import TableOptions, group_rows
from stages.read_webdataset import ShardOptions, shard_rows
from stages.stream import epoch_listing, load_images, load_kept, training_dataset
from tests.tiny import TINY_CURATE, as_overrides


@dataclass(frozen=True)
class Item:
    key: str  # the file's stem: unique across classes in demo data
    ext: str
    data: bytes
    label: int
    class_name: str


def folder_items(root: Path) -> tuple[list[Item], list[str]]:
    """Every image file of a demo folder (bad ones too), in path order, and the sorted class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [
        Item(f.name.split(".")[0], f.name.split(".", 1)[1], f.read_bytes(), classes.index(c), c)
        for c in classes
        for f in sorted((root / c).iterdir())
    ]
    return items, classes


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def write_shards(
    items: list[Item], folder: str, per_shard: int, first: int = 0, label: str = "cls"
) -> list[str]:
    """`items` as webdataset shards `folder/train-NNNNNN.tar` (image + `.cls`, or `.json` with the class
    name as `label`, and a `.txt` caption as real shards have); returns their URLs."""
    urls = []
    for n, start in enumerate(range(0, len(items), per_shard), start=first):
        members = []
        for item in items[start : start + per_shard]:
            members.append((f"{item.key}.{item.ext}", item.data))
            if label == "cls":
                members.append((f"{item.key}.cls", str(item.label).encode()))
            else:
                members.append((f"{item.key}.json", json.dumps({"label": item.class_name}).encode()))
            members.append((f"{item.key}.txt", b"a caption"))
        url = join(folder, f"train-{n:06d}.tar")
        with fsspec.open(url, "wb") as f:
            f.write(tar_bytes(members))
        urls.append(url)
    return urls


def write_table(items: list[Item], url: str, hf_struct: bool = True, names: bool = False) -> None:
    """`items` as one Parquet table in row groups of 8: the Hugging Face image struct or raw bytes, integer
    labels or class names."""
    images = (
        [{"bytes": i.data, "path": f"{i.key}.{i.ext}"} for i in items]
        if hf_struct
        else [i.data for i in items]
    )
    labels = [i.class_name for i in items] if names else [i.label for i in items]
    with fsspec.open(url, "wb") as f:
        pq.write_table(pa.table({"image": images, "label": labels}), f, row_group_size=8)


def curate_none(input_url: str, output: str, *overrides: str) -> CurateResult:
    return curate(
        load_config(None, [f"data.input={input_url}", f"output={output}", "score.method=none", *overrides])
    )


def by_sha(result: CurateResult) -> dict[str, str]:
    return dict(zip(result.manifest["sha256"], result.manifest["class_name"], strict=True))


def quarantined(result: CurateResult) -> set[tuple[str, str]]:
    return set(zip(result.quarantine["sha256"], result.quarantine["reason"], strict=True))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 images per class (png and jpg) and the demo's 7 bad files, as a folder."""
    root = tmp_path_factory.mktemp("formats") / "images"
    write_demo_data(str(root), DemoSpec(per_class=3, bad=7, seed=1))
    return root


# ---------------------------------------------------------------------------------------------- no Ray


def test_brace_patterns_and_member_paths() -> None:
    assert expand_braces("s3://b/train-{000..002}.tar") == [f"s3://b/train-00{i}.tar" for i in range(3)]
    assert expand_braces("x-{a,b}-{1..2}") == ["x-a-1", "x-a-2", "x-b-1", "x-b-2"]
    assert expand_braces("{9..11}") == ["9", "10", "11"]
    with pytest.raises(FormatError):
        expand_braces("s3://b/train-{000..002.tar")
    assert split_member("s3://b/train-000001.tar#dir/000123") == ("s3://b/train-000001.tar", "dir/000123")
    assert split_member("s3://b/t.parquet#17") == ("s3://b/t.parquet", "17")
    assert split_member("s3://b/cat/img#1.jpg") is None  # a folder's file with '#' in its name


def test_auto_format_follows_what_the_url_holds(demo: Path, tmp_path: Path) -> None:
    items, _ = folder_items(demo)
    write_shards(items[:6], str(tmp_path / "wds"), per_shard=3)
    write_table(items[:6], str(tmp_path / "tables" / "t.parquet"))

    def detected(url: str, *overrides: str) -> str:
        data = load_config(None, [f"data.input={url}", *overrides]).data
        return detect_format(data, find_inputs(data))

    assert detected(str(demo)) == "folder"  # its _truth.parquet sidecar is hidden: still a folder
    assert detected(str(tmp_path / "wds")) == "webdataset"
    assert detected(str(tmp_path / "wds" / "train-{000000..000001}.tar")) == "webdataset"
    assert detected(str(tmp_path / "wds" / "*.tar")) == "webdataset"
    assert detected(str(tmp_path / "tables")) == "parquet"
    assert detected(str(tmp_path / "tables" / "t.parquet")) == "parquet"
    assert detected(str(tmp_path / "wds"), "data.format=folder") == "folder"
    (tmp_path / "wds" / "stray.jpg").write_bytes(items[0].data)
    with pytest.raises(FormatError, match=r"data\.format"):
        detected(str(tmp_path / "wds"))
    data = load_config(None, [f"data.input={tmp_path / 'wds' / 'train-{000000..000009}.tar'}"]).data
    check_input(data)  # the pattern's folder is readable ...
    with pytest.raises(Exception, match="8 of the 10 files"):  # ... but most of the shards it names are not
        find_inputs(data)


def test_bad_samples_in_a_shard_become_rows_with_their_key(
    ray_cluster: None, demo: Path, tmp_path: Path
) -> None:
    good = next(i for i in folder_items(demo)[0] if i.ext == "jpg" and not i.key.startswith("bad"))
    cls = str(good.label).encode()
    members = [
        ("ok.jpg", good.data), ("ok.cls", cls),
        ("cut.jpg", good.data[: len(good.data) // 2]), ("cut.cls", cls),  # a truncated image
        ("nolabel.jpg", good.data),  # no .cls
        ("textonly.txt", b"only a caption"), ("textonly.cls", cls),  # no image member
        ("badcls.jpg", good.data), ("badcls.cls", b"cat"),
        ("ok.png", good.data), ("ok.cls", cls),  # the key again, later in the shard
    ]  # fmt: skip
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes(members))
    options = ShardOptions({})
    rows = {r["path"].split("#")[1]: r for r in shard_rows(str(shard), options)}
    assert {k: r["read_reason"] for k, r in rows.items()} == {
        "ok": "duplicate-key",  # the second "ok" sample (the first is read: its row is overwritten here)
        "cut": "",  # the bytes are read; decode finds the truncation
        "nolabel": "missing-label",
        "textonly": "no-image",
        "badcls": "bad-label",
    }
    assert "txt" in rows["textonly"]["read_error"]
    unlabeled = {
        r["path"].split("#")[1]: r
        for r in shard_rows(str(shard), ShardOptions({}, labels=LabelOptions(missing="unlabeled")))
    }
    assert unlabeled["nolabel"]["read_reason"] == "" and unlabeled["nolabel"]["label"] == -1

    # A shard cut inside a member: the samples before it stand, the one it was in is `truncated`.
    whole = tar_bytes([("a.jpg", good.data), ("a.cls", cls), ("b.jpg", good.data), ("b.cls", cls)])
    inside_b = whole.index(good.data, 513) + len(good.data) // 2  # halfway through b.jpg's data
    (tmp_path / "cut.tar").write_bytes(whole[:inside_b])
    cut = shard_rows(str(tmp_path / "cut.tar"), options)
    assert [(r["path"].split("#")[-1], r["read_reason"]) for r in cut] == [("a", ""), ("b", "truncated")]
    (tmp_path / "junk.tar").write_bytes(b"\x13" * 3000)
    junk = shard_rows(str(tmp_path / "junk.tar"), options)
    assert [(r["path"], r["read_reason"]) for r in junk] == [(str(tmp_path / "junk.tar"), "corrupt")]

    # Curated with Ray Data: each becomes a quarantine row named by shard and key, never a crash.
    result = curate_none(str(tmp_path), str(tmp_path / "out"), "data.format=webdataset")
    assert dict(zip(result.quarantine["path"], result.quarantine["reason"], strict=True)) == {
        f"{shard}#ok": "duplicate-key",
        f"{shard}#cut": "truncated",
        f"{shard}#nolabel": "missing-label",
        f"{shard}#textonly": "no-image",
        f"{shard}#badcls": "bad-label",
        f"{tmp_path / 'cut.tar'}#b": "truncated",
        str(tmp_path / "junk.tar"): "corrupt",
    }
    assert sorted(result.manifest["path"]) == [f"{tmp_path / 'cut.tar'}#a", f"{shard}#ok"]


def test_bad_rows_in_a_table_become_rows_with_their_index(demo: Path, tmp_path: Path) -> None:
    image = folder_items(demo)[0][1].data
    table = pa.table(
        {
            "image": [
                {"bytes": image, "path": "a.jpg"},
                {"bytes": None, "path": "elsewhere.jpg"},
                None,
                {"bytes": image, "path": None},
                {"bytes": image, "path": None},
            ],
            "label": ["digit_1", "digit_1", "digit_1", None, "cat"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    options = TableOptions({}, labels=LabelOptions(classes=("digit_0", "digit_1")))
    rows = group_rows(str(tmp_path / "t.parquet"), 0, 0, options)
    assert [(r["path"].rsplit("#")[1], r["label"], r["read_reason"]) for r in rows] == [
        ("0", 1, ""),
        ("1", -1, "no-image"),
        ("2", -1, "no-image"),
        ("3", -1, "missing-label"),
        ("4", -1, "bad-label"),
    ]
    assert "elsewhere.jpg" in rows[1]["read_error"]
    data = load_config(None, [f"data.input={tmp_path}", "data.image_column=pixels"]).data
    with pytest.raises(FormatError, match="no image column 'pixels'"):
        list_source(data)


def test_text_labels_are_numbered_in_sorted_order_and_integers_name_themselves() -> None:
    data = load_config(None, ["data.input=x"]).data
    named = pd.DataFrame({"label": [-1, -1, -1], "class_name": ["dog", "cat", "dog"]})
    frame, classes = finish_labels(named, data)
    assert classes == ["cat", "dog"] and frame["label"].tolist() == [1, 0, 1]
    numbered = pd.DataFrame({"label": [0, 3, -1], "class_name": ["0", "3", ""]})
    assert finish_labels(numbered, data)[1] == ["0", "1", "2", "3"]  # label i is classes[i]
    with pytest.raises(FormatError, match=r"data\.classes"):
        finish_labels(pd.DataFrame({"label": [0, -1], "class_name": ["0", "cat"]}), data)


def test_the_stream_reads_each_container_once_per_pass(demo: Path, tmp_path: Path, monkeypatch) -> None:
    """What `training_dataset` and `decode_here` read, without Ray: every block of an epoch listing is read
    by one ReadBytes in batches; each shard (Parquet row group) is fetched once per pass, not per image."""
    items = [i for i in folder_items(demo)[0] if not i.key.startswith("bad")]
    shards = write_shards(items, str(tmp_path / "wds"), per_shard=7)
    write_table(items, str(tmp_path / "t.parquet"))
    sha = {hashlib.sha256(i.data).hexdigest() for i in items}
    shard_paths = [f"{u}#{i.key}" for n, u in enumerate(shards) for i in items[n * 7 : (n + 1) * 7]]
    table_paths = [f"{tmp_path / 't.parquet'}#{r}" for r in range(len(items))]
    config = load_config(None, ["data.read_batch_size=4", "data.task_rows=16"])
    fetched: list[str] = []
    real_shard, real_group = read_module.shard_images, read_parquet._read_group
    monkeypatch.setattr(
        read_module, "shard_images", lambda url, *a: fetched.append(url) or real_shard(url, *a)
    )
    monkeypatch.setattr(
        read_parquet, "_read_group", lambda url, g, *a: fetched.append(f"{url}@{g}") or real_group(url, g, *a)
    )

    for paths, containers in ((shard_paths, len(shards)), (table_paths, -(-len(items) // 8))):
        fetched.clear()
        listing = epoch_listing(pd.DataFrame({"path": paths}), epochs=2, seed=3)
        groups = member_groups(listing.paths, config.data)
        read = ReadBytes.for_data(config.data)
        blobs = []
        for block in grouped_blocks(groups, listing.paths, config.data.task_rows):
            rows = [listing.paths[i] for i in block]
            for start in range(0, len(rows), 4):  # read_batch_size rows per call, as map_batches hands them
                blobs += list(read({"path": np.asarray(rows[start : start + 4], dtype=object)})["bytes"])
        assert len(fetched) == 2 * containers, fetched  # each container once per epoch
        assert {hashlib.sha256(b).hexdigest() for b in blobs} == sha and len(blobs) == 2 * len(items)
        images = load_images(paths, config)  # the in-process reader (validation, evaluation): same images
        assert (
            images.shape == (len(items), 32, 32, 3) and images.reshape(len(items), -1).std(axis=1).min() > 0
        )


# ---------------------------------------------------------------------------------------------- with Ray


def test_shards_and_tables_curate_to_the_images_of_the_folder(
    ray_cluster: None, demo: Path, tmp_path: Path
) -> None:
    items, classes = folder_items(demo)
    folder = curate_none(str(demo), str(tmp_path / "out-folder"))
    shards = write_shards(items, str(tmp_path / "wds"), per_shard=10)
    write_table(items[:20], str(tmp_path / "tables" / "a.parquet"))
    write_table(items[20:], str(tmp_path / "tables" / "b.parquet"))
    named = f"data.classes=[{','.join(classes)}]"
    wds = curate_none(str(tmp_path / "wds"), str(tmp_path / "out-wds"), named)
    table = curate_none(str(tmp_path / "tables"), str(tmp_path / "out-table"), named)

    assert len(folder.manifest) == 30 and len(folder.quarantine) == 7
    for other in (wds, table):
        assert by_sha(other) == by_sha(folder)  # the same images kept, with the same classes
        assert quarantined(other) == quarantined(folder)  # the same bad files, for the same reasons
        assert (other.manifest["label"].to_numpy() >= 0).all()
    assert wds.manifest["path"].str.fullmatch(r".*/train-\d{6}\.tar#digit_\d_\d{5}").all()
    assert set(wds.quarantine["path"]) == {
        f"{shards[i // 10]}#{it.key}" for i, it in enumerate(items) if it.key.startswith("bad")
    }
    assert table.manifest["path"].str.fullmatch(r".*/tables/[ab]\.parquet#\d+").all()
    assert set(load_kept(wds.manifest_url)["sha256"]) == set(folder.manifest["sha256"])


def test_formats_on_s3_with_a_brace_pattern_and_class_names(
    ray_cluster: None, s3_bucket: str, demo: Path
) -> None:
    """On moto's S3: shards named by a brace pattern with labels as class names in a JSON field, and a
    table of raw bytes with text labels; classes are the sorted names, as a folder's are."""
    items, classes = folder_items(demo)
    good = [i for i in items if not i.key.startswith("bad")]
    write_shards(good, f"{s3_bucket}/wds", per_shard=8, label="json")
    write_table(good, f"{s3_bucket}/t.parquet", hf_struct=False, names=True)
    wds = curate_none(
        f"{s3_bucket}/wds/train-{{000000..000003}}.tar", f"{s3_bucket}/out-wds", "data.label_field=label"
    )
    table = curate_none(f"{s3_bucket}/t.parquet", f"{s3_bucket}/out-table")
    expected = {hashlib.sha256(i.data).hexdigest(): i.class_name for i in good}
    for result in (wds, table):
        assert by_sha(result) == expected and result.quarantine.empty
        labels = dict(zip(result.manifest["class_name"], result.manifest["label"], strict=True))
        assert labels == {c: classes.index(c) for c in classes}
    assert wds.manifest["path"].str.startswith(f"{s3_bucket}/wds/train-00000").all()
    pattern = f"{s3_bucket}/wds/train-{{000000..000001}}.tar"  # the command line takes a pattern as input
    done = CliRunner().invoke(app, ["curate", "-i", pattern, "-o", f"{s3_bucket}/cli", "--score", "none",
                                    "--set", "data.label_field=label"])  # fmt: skip
    assert done.exit_code == 0 and "16 images in the manifest" in done.output, done.output
    # The training stream reads the table's rows back from S3 by row group, every pass.
    kept = load_kept(table.manifest_url)
    stream = training_dataset(kept, load_config(None, ["data.read_batch_size=8"]), epochs=2, seed=0)
    labels = np.concatenate([b["label"] for b in stream.iter_batches(batch_size=16, batch_format="numpy")])
    assert sorted(labels.tolist()) == sorted(2 * kept["label"].tolist())


def test_an_incremental_curate_over_grown_shards_scores_only_the_new_samples(
    ray_cluster: None, demo: Path, tmp_path: Path
) -> None:
    items, classes = folder_items(demo)
    good = [i for i in items if not i.key.startswith("bad")]
    settings = [f"data.classes=[{','.join(classes)}]", "score.method=el2n", *as_overrides(TINY_CURATE)]
    folder, output = str(tmp_path / "wds"), str(tmp_path / "out")
    write_shards(good[:20], folder, per_shard=10)

    def run() -> CurateResult:
        return curate(load_config(None, [f"data.input={folder}", f"output={output}", *settings]))

    first = run()
    assert first.counts["scored"] == 20 and first.counts.get("cached", 0) == 0
    write_shards(good[20:], folder, per_shard=10, first=2)  # a new shard lands beside the old ones
    second = run()
    assert second.counts["scored"] == 10 and second.counts["cached"] == 20
    old = first.manifest.set_index("sha256")["el2n"]
    again = second.manifest.set_index("sha256")["el2n"].loc[old.index]
    np.testing.assert_allclose(again.to_numpy(), old.to_numpy())  # cached scores, not new ones
