"""Bad config and bad input: each is one error line that names the problem, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def _fails_clearly(args: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with exactly one `error:` line holding every needle, and no traceback."""
    result = runner.invoke(app, args, env={"COLUMNS": "1000"})  # wide: rich must not wrap the line
    text = result.output
    assert result.exit_code == 2, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A tiny image folder. Config errors are found before Ray starts; tests of errors found while listing
    (labels tables) ask for the session's Ray, so the CLI joins it instead of starting one."""
    from pipeline.demo_data import DemoSpec, write_demo_data

    root = tmp_path / "images"
    write_demo_data(str(root), DemoSpec(per_class=2, seed=0))
    return root


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["prune.kepp=0.5"], ["unknown config key 'prune.kepp'", "keep"]),
        (["pretrain.steps=many"], ["'pretrain.steps'", "valid integer", "'many'"]),
        (["prune.offset=-0.1"], ["'prune.offset'", "greater than or equal to 0"]),
        (["prune.keep=0"], ["'prune.keep'", "greater than 0"]),
        (["prune.keep=1.5"], ["'prune.keep'", "less than or equal to 1"]),
        (["ray.data_cpu_share=-1"], ["'ray.data_cpu_share'"]),
        (["decode.image_size=[32, 32]"], ["'decode.image_size'"]),
        (["pretrain.mask.schedule=cosine"], ["pretrain.mask.ratio_end"]),
        (["data.storage_options=not-a-mapping"], ["'data.storage_options'", "dictionary"]),
        (["noequals"], ["dotted.key=value"]),
    ],
)
def test_bad_overrides(overrides: list[str], needles: list[str], images: Path, tmp_path: Path) -> None:
    args = ["curate", "-i", str(images), "-o", str(tmp_path / "o")]
    for o in overrides:
        args += ["--set", o]
    joined = _fails_clearly(args, *needles)
    assert "not-a-mapping" not in joined  # storage_options values are never echoed (they hold secrets)


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2"])
def test_keep_flag_out_of_range(keep: str, images: Path, tmp_path: Path) -> None:
    _fails_clearly(["curate", "-i", str(images), "-o", str(tmp_path / "o"), "--keep", keep], "'prune.keep'")


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("prune:\n  keep: 0.5\n  polcy: random\n", ["unknown config key 'prune.polcy'"]),
        ("score:\n  method: el2m\n", ["'score.method'", "el2m"]),
        ("prune: [1, 2]\n", ["'prune'"]),
        ("- just\n- a list\n", ["must hold a mapping"]),
        ("prune: {keep: 0.5\n", ["not valid YAML"]),
    ],
)
def test_bad_config_files(text: str, needles: list[str], images: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad config.yaml"
    path.write_text(text)
    _fails_clearly(["curate", "-i", str(images), "-o", str(tmp_path / "o"), "-c", str(path)], *needles)


def test_missing_config_file(images: Path, tmp_path: Path) -> None:
    _fails_clearly(["curate", "-i", str(images), "-c", str(tmp_path / "nope.yaml")], "config file not found")


def test_demo_data_negative_noise(tmp_path: Path) -> None:
    _fails_clearly(["demo-data", str(tmp_path / "d"), "--noise", "-0.1"], "--noise", "-0.1")


def test_no_input(tmp_path: Path) -> None:
    _fails_clearly(["curate", "-o", str(tmp_path / "o")], "no input")


def test_empty_input_folder(ray_cluster: None, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    _fails_clearly(["curate", "-i", str(empty), "-o", str(tmp_path / "o")], "no images found", str(empty))


def test_empty_input_bucket(ray_cluster: None, s3_bucket: str) -> None:
    _fails_clearly(["curate", "-i", s3_bucket, "-o", f"{s3_bucket}/out"], "no images found", s3_bucket)


def test_nothing_decodes_is_one_line_and_quarantine_is_written(ray_cluster: None, tmp_path: Path) -> None:
    """All files bad: the error names the quarantine file, which holds every reason; the manifest beside it
    is empty, so the pair still comes from one run."""
    bad = tmp_path / "bad" / "cat"
    bad.mkdir(parents=True)
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    (bad / "html.png").write_text("<html>503</html>")
    out = tmp_path / "o"
    _fails_clearly(["curate", "-i", str(bad.parent), "-o", str(out)], "none of the 3", "quarantine.parquet")
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert sorted(quarantine["reason"]) == ["empty", "not-an-image", "not-an-image"]
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 0 and {"path", "kept", "reason"} <= set(manifest.columns)


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["pretrain.model=vit_gigantic"], ["unknown MAE size", "mae_vit_mini_patch4"]),
        (["pretrain.model=mae_vit_small_patch16", "pretrain.image_size=40"], ["40", "patch size 16"]),
        (["pretrain.decoder_dim=34"], ["decoder_dim", "34"]),
    ],
)
def test_bad_model_settings_fail_before_curation(
    overrides: list[str], needles: list[str], images: Path, tmp_path: Path
) -> None:
    """`maskdiet run` checks the model before it reads a single image (it would fail in every Train worker)."""
    args = ["run", "--set", f"data.input={images}", "--set", f"output={tmp_path / 'o'}"]
    for override in overrides:
        args += ["--set", override]
    _fails_clearly(args, *needles)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- labels tables


def _labels_case(
    images: Path, tmp_path: Path, frame: pd.DataFrame | None, raw: str | None = None
) -> list[str]:
    path = tmp_path / "labels.csv"
    if frame is not None:
        frame.to_csv(path, index=False)
    else:
        path.write_text(raw or "")
    return ["curate", "-i", str(images), "-o", str(tmp_path / "o"), "--set", f"data.labels={path}"]


def _listed(images: Path) -> list[str]:
    return sorted(str(p.relative_to(images)) for p in images.rglob("*.*") if not p.name.startswith("_"))


def test_labels_table_with_missing_files(ray_cluster: None, images: Path, tmp_path: Path) -> None:
    rows = [*_listed(images)[:3], "digit_0/not-there.png", "gone/also-missing.jpg"]
    args = _labels_case(images, tmp_path, pd.DataFrame({"path": rows, "label": [0] * len(rows)}))
    _fails_clearly(args, "references 2 file(s) not found", "not-there.png")


def test_labels_table_without_label_column(ray_cluster: None, images: Path, tmp_path: Path) -> None:
    args = _labels_case(images, tmp_path, pd.DataFrame({"path": _listed(images)[:2], "class": [0, 1]}))
    _fails_clearly(args, "lacks column(s) ['label']")


def test_labels_table_with_text_labels(ray_cluster: None, images: Path, tmp_path: Path) -> None:
    rows = _listed(images)[:3]
    args = _labels_case(images, tmp_path, pd.DataFrame({"path": rows, "label": ["cat", "dog", "1"]}))
    _fails_clearly(args, "column 'label' must hold integers", "'cat'")


def test_labels_table_with_duplicate_paths(ray_cluster: None, images: Path, tmp_path: Path) -> None:
    rows = _listed(images)[:2]
    args = _labels_case(images, tmp_path, pd.DataFrame({"path": rows + rows[:1], "label": [0, 1, 1]}))
    _fails_clearly(args, "more than once", rows[0])


def test_labels_table_that_is_not_a_table(ray_cluster: None, images: Path, tmp_path: Path) -> None:
    args = _labels_case(images, tmp_path, None, raw='path,label\n"unterminated,0\n')
    _fails_clearly(args, "not a readable CSV file")


def test_missing_labels_table(ray_cluster: None, images: Path, tmp_path: Path) -> None:
    args = ["curate", "-i", str(images), "-o", str(tmp_path / "o"), "--set", f"data.labels={tmp_path}/no.csv"]
    _fails_clearly(args, "labels table not found")
