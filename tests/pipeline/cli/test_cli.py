"""The CLI as a user runs it: real subprocesses for the help screens and a first run, the in-process runner
(sharing the session's Ray) for the rest."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.common import loss_change
from pipeline.demo_data import DemoSpec, write_demo_data

runner = CliRunner()


def test_help_lists_every_command() -> None:
    out = subprocess.run(["maskdiet", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("curate", "demo-data"):
        assert command in out


@pytest.mark.parametrize("command", ["curate", "demo-data"])
def test_each_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--config" in result.output and "--set" in result.output


def test_demo_data_then_curate_in_subprocesses(tmp_path: Path) -> None:
    """The issue's acceptance commands, run exactly as a user types them (own local Ray)."""
    data, out = tmp_path / "d", tmp_path / "o"
    subprocess.run(["maskdiet", "demo-data", str(data), "--bad", "10", "--per-class", "10"], check=True)
    done = subprocess.run(
        [
            "maskdiet",
            "curate",
            "--input",
            str(data),
            "--output",
            str(out),
            "--score",
            "none",
            "--set",
            "ray.num_cpus=2",
            "--set",
            "ray.include_dashboard=false",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "100 images in the manifest" in done.stderr and "10 quarantined" in done.stderr
    assert len(pd.read_parquet(out / "manifest.parquet")) == 100


def test_curate_on_s3_in_process(ray_cluster: None, s3_bucket: str) -> None:
    result = runner.invoke(app, ["demo-data", f"{s3_bucket}/img", "--per-class", "5", "--bad", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["curate", "-i", f"{s3_bucket}/img", "-o", f"{s3_bucket}/out", "--score", "none"]
    )
    assert result.exit_code == 0, result.output
    assert "50 images in the manifest" in result.output and "3 quarantined" in result.output


def test_bad_set_key_is_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["curate", "-i", str(tmp_path), "--set", "pretrain.stpes=3"])
    assert result.exit_code == 2
    assert "unknown config key 'pretrain.stpes'" in result.output and "Traceback" not in result.output


def test_missing_input_is_one_line_error(ray_cluster: None, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["curate", "-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o"), "--score", "none"]
    )
    assert result.exit_code == 2 and "input not found" in result.output


def test_missing_bucket_is_one_line_error(ray_cluster: None, s3_server: str, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["curate", "-i", "s3://no-such-bucket-here/x", "-o", str(tmp_path), "--score", "none"]
    )
    assert (
        result.exit_code == 2 and "no-such-bucket-here" in result.output and "Traceback" not in result.output
    )


def test_run_writes_demo_images_only_into_the_demo_folder(ray_cluster: None, tmp_path: Path) -> None:
    """`maskdiet run --set data.input=URL` (no CONFIG) reads URL as it is: no demo images are written there."""
    mine = tmp_path / "my-images"
    result = runner.invoke(app, ["run", "--set", f"data.input={mine}", "--set", f"output={tmp_path / 'o'}"])
    assert result.exit_code == 2 and "input not found" in result.output, result.output
    assert not mine.exists()


def test_two_config_files_are_an_error(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("pretrain:\n  steps: 5\n")
    for command in ("run", "sweep"):
        result = runner.invoke(app, [command, str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml")])
        assert result.exit_code == 2 and "two config files" in result.output, result.output


def test_random_pruning_needs_no_scores(ray_cluster: None, tmp_path: Path) -> None:
    """`curate --score none --policy random --keep 0.5` draws the random baseline (it used to keep all)."""
    write_demo_data(str(tmp_path / "img"), DemoSpec(per_class=4, seed=3))
    args = ["curate", "-i", str(tmp_path / "img"), "-o", str(tmp_path / "o"), "--score", "none"]
    result = runner.invoke(app, [*args, "--policy", "random", "--keep", "0.5"])
    assert result.exit_code == 0, result.output
    manifest = pd.read_parquet(tmp_path / "o" / "manifest.parquet")
    assert len(manifest) == 40 and manifest["kept"].sum() == 20
    assert set(manifest.loc[~manifest["kept"], "reason"]) == {"pruned:random"}


def test_an_unusable_url_scheme_is_one_line_error(tmp_path: Path) -> None:
    """A scheme whose package is missing (as gs:// without gcsfs) or that fsspec does not know is named in one
    line with exit code 2, whether it is the input, the output or the config file."""
    import fsspec

    fsspec.register_implementation(
        "missingfs", "maskdiet_no_such_package.FileSystem", errtxt="Please install missingfs", clobber=True
    )
    for scheme, says in (("missingfs", "Please install missingfs"), ("nope", "Protocol not known: nope")):
        for args in (
            ["demo-data", f"{scheme}://bucket/digits"],
            ["curate", "-i", f"{scheme}://bucket/train", "-o", str(tmp_path)],
            ["curate", "-i", str(tmp_path), "--config", f"{scheme}://bucket/c.yaml"],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, (args, result.output)
            assert says in result.output and "Traceback" not in result.output


def test_a_one_line_run_shows_its_loss_once() -> None:
    """`pretrain --steps 5` logs one line (log_every is 10): it printed "2.6776 → 2.6776"."""
    assert loss_change(2.6776, 2.6776) == "2.6776"
    assert loss_change(1.78251, 0.46561) == "1.7825 → 0.4656"
