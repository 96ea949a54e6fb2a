"""Hostile image files through `maskdiet curate`: every listed file lands in the manifest or in quarantine
with the right reason, nothing crashes, and the counts add up.

The corpus (see conftest.py) has 19 odd or broken kinds plus plain images; odd-but-valid files (huge, CMYK,
16-bit, palette+transparency, animated, EXIF-rotated, wrong extension, 1×1, ...) must be decoded, broken
ones (empty, random bytes, HTML, truncated JPEG/PNG/WebP, decompression bomb) quarantined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import load_config
from pipeline.curate import decode_listing
from stages.read import list_images
from tests.tiny import TINY_RUN, as_sets

runner = CliRunner()

SMALL_RUN = as_sets(TINY_RUN)


def _expected(root: str, corpus: list) -> dict[str, str]:
    sep = "" if root.endswith("/") else "/"
    return {f"{root}{sep}{f.name}": f.expected for f in corpus}


def _check_outcome(out: str, expected: dict[str, str], output_text: str) -> None:
    manifest = pd.read_parquet(f"{out}/manifest.parquet")
    quarantine = pd.read_parquet(f"{out}/quarantine.parquet")
    got = dict.fromkeys(manifest["path"], "ok") | dict(
        zip(quarantine["path"], quarantine["reason"], strict=True)
    )
    # every listed file exactly once, nothing else (hidden files, '_' sidecars and .txt are never listed)
    assert len(manifest) + len(quarantine) == len(expected) == len(got)
    wrong = {
        p: (expected.get(p), got.get(p)) for p in set(expected) | set(got) if expected.get(p) != got.get(p)
    }
    assert not wrong, f"(expected, got) per path: {wrong}"
    assert manifest["kept"].all() and (manifest["reason"] == "kept").all()
    assert quarantine["error"].str.len().gt(0).all()  # every quarantine row says what went wrong
    good = sum(v == "ok" for v in expected.values())
    assert f"{good} images in the manifest" in output_text
    assert f"{len(expected) - good} quarantined" in output_text


def test_curate_sorts_every_hostile_file(
    ray_cluster: None, corpus: list, corpus_writer, tmp_path: Path
) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    corpus_writer(str(root), corpus)
    result = runner.invoke(app, ["curate", "-i", str(root), "-o", str(out), "--score", "none"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    _check_outcome(str(out), _expected(str(root), corpus), result.output)


def test_curate_on_s3_under_a_path_with_spaces_and_unicode(
    ray_cluster: None, s3_bucket: str, corpus: list, corpus_writer
) -> None:
    """The same corpus in a bucket, under a prefix with spaces and non-ASCII characters."""
    root = f"{s3_bucket}/Bilder vom Straßenfest/été 2026"
    corpus_writer(root, corpus)
    out = f"{s3_bucket}/curated ü"
    result = runner.invoke(app, ["curate", "-i", root, "-o", out, "--score", "none"])
    assert result.exit_code == 0, result.output
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    local = {}
    for name in ("manifest.parquet", "quarantine.parquet"):
        local[name] = pd.read_parquet(fs.open(f"{out}/{name}".removeprefix("s3://"), "rb"))
    manifest, quarantine = local["manifest.parquet"], local["quarantine.parquet"]
    expected = _expected(root, corpus)
    got = dict.fromkeys(manifest["path"], "ok") | dict(
        zip(quarantine["path"], quarantine["reason"], strict=True)
    )
    assert got == expected


def test_odd_but_valid_files_decode_to_the_right_pixels(
    ray_cluster: None, corpus: list, corpus_writer, tmp_path: Path
) -> None:
    """Through the same Ray Data read + decode the CLI uses: orientation, colour and size come out right."""
    root = tmp_path / "in"
    corpus_writer(str(root), corpus)
    config = load_config(overrides=[f"data.input={root}", "decode.image_size=16", "decode.resize=squash"])
    decoded = decode_listing(list_images(config.data), config, keep_images=True)
    assert decoded.images is not None and len(decoded.images) == len(decoded.frame)
    images = decoded.images.take(np.arange(len(decoded.frame)))  # a few images: gathered for the checks
    assert images.shape == (len(decoded.frame), 16, 16, 3)
    pixels = {Path(p).name: img.astype(int) for p, img in zip(decoded.frame["path"], images, strict=True)}
    # EXIF orientation 6 turns the stored portrait back into the 64x32 landscape gradient: red grows
    # left→right and green top→bottom, as in the original
    rotated = pixels["exif-rotated.jpg"]
    assert rotated[:, -1, 0].mean() - rotated[:, 0, 0].mean() > 150
    assert rotated[-1, :, 1].mean() - rotated[0, :, 1].mean() > 150
    # the 4000x3000 image is resized, not rejected, and keeps its gradient
    huge = pixels["huge-legal.jpg"]
    assert huge[:, -1, 0].mean() - huge[:, 0, 0].mean() > 150
    # 1x1 is upscaled to a flat image of its one colour
    assert np.abs(pixels["one-pixel.png"] - np.array([10, 200, 30])).max() <= 2
    # the animated GIF shows its first (red) frame
    gif = pixels["animated.gif"]
    assert gif[..., 0].mean() > 200 and gif[..., 1:].mean() < 50
    # 16-bit spans its full range after scaling to 8 bits; CMYK keeps its colours close to the RGB source
    assert pixels["sixteen-bit.png"].max() >= 245 and pixels["sixteen-bit.png"].min() <= 10
    assert np.abs(pixels["cmyk.jpg"] - pixels["png-named.jpg"]).mean() < 12


@pytest.mark.slow
def test_run_survives_the_corpus(ray_cluster: None, corpus: list, corpus_writer, tmp_path: Path) -> None:
    """`maskdiet run` over hostile files mixed into a small demo set: the run finishes and its manifest and
    quarantine account for every file."""
    from pipeline.demo_data import DemoSpec, write_demo_data

    root, out = tmp_path / "in", tmp_path / "out"
    demo = write_demo_data(str(root), DemoSpec(per_class=6, seed=2))
    corpus_writer(str(root / "digit_0" / "hostile"), corpus)
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  input: {root}\noutput: {out}\n")
    result = runner.invoke(app, ["run", str(config), *SMALL_RUN])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (out / "runs").iterdir() if p.is_dir()]
    manifest = pd.read_parquet(run_dir / "manifest.parquet")
    quarantine = pd.read_parquet(run_dir / "quarantine.parquet")
    bad = sum(f.expected != "ok" for f in corpus)
    assert len(quarantine) == bad
    assert len(manifest) == demo.images + len(corpus) - bad
