"""`maskdiet demo-data and curate`: write a demo image folder; read, decode, score and prune images."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import (
    ConfigError,
    ConfigOption,
    SetOption,
    VerboseOption,
    app,
    command_context,
    console,
    keep_flag_wins,
    make_config,
    progress_display,
)


@app.command("demo-data")
def demo_data(
    output: Annotated[str, typer.Argument(help="Where to write the image folder (path or fsspec URL).")],
    noise: Annotated[float, typer.Option(help="Fraction of images moved to a wrong class folder.")] = 0.0,
    bad: Annotated[int, typer.Option(help="Number of bad files to add (empty, truncated, bombs, ...).")] = 0,
    classes: Annotated[
        str,
        typer.Option(
            help="Comma-separated sources: digits, shapes, photos; or fashion (Fashion-MNIST's real images, "
            "from `apt-get install dataset-fashion-mnist`)."
        ),
    ] = "digits",
    per_class: Annotated[int, typer.Option(help="Images per class (fashion: at most this many).")] = 200,
    size: Annotated[
        int | None, typer.Option(help="Image side in pixels (default 32; fashion: its own 28).")
    ] = None,
    split: Annotated[str, typer.Option(help="fashion: the official train or test split.")] = "train",
    image_format: Annotated[str, typer.Option("--format", help="png, jpg or mixed.")] = "mixed",
    seed: Annotated[int, typer.Option(help="Random seed (the output is deterministic).")] = 0,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write a labeled demo image folder (<class>/<file>) made offline, with optional label noise and bad
    files; the truth goes to _truth.parquet and _bad.parquet beside it. `--classes fashion --split test`
    writes Fashion-MNIST's official test images, to evaluate on (`evaluate.test_data`)."""
    from pipeline.demo_data import DemoSpec, write_demo_data

    with command_context(verbose):
        cfg = make_config(config, set_)
        spec = DemoSpec(
            sources=tuple(s.strip() for s in classes.split(",") if s.strip()),
            per_class=per_class,
            size=size,
            noise=noise,
            bad=bad,
            image_format=image_format,
            seed=seed,
            split=split,
        )
        result = write_demo_data(output, spec, cfg.data.storage_options)
    console.print(
        f"wrote [bold]{result.images}[/] images in {len(result.classes)} classes "
        f"({result.noisy} with a wrong label, {result.bad} bad files) to {output}"
    )


# ---------------------------------------------------------------------------------------------- curate


def print_counts(title: str, counts: dict[str, int]) -> None:
    table = Table(title=title)
    table.add_column("outcome")
    table.add_column("count", justify="right")
    for key in sorted(counts):
        table.add_row(key, str(counts[key]))
    console.print(table)


def print_score_summary(manifest: object, method: str) -> None:
    """Per class: how many images, how many kept, and the score's spread (higher = harder)."""
    from stages.prune import score_summary

    summary = score_summary(manifest)  # type: ignore[arg-type]
    table = Table(title=f"{method} score per class (higher = harder)")
    for column in summary.columns:
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in summary.itertuples(index=False):
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


@app.command()
def curate(
    input_url: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="Image folder URL (<root>/<class>/<file>), WebDataset shards (a prefix or brace pattern of "
            ".tar files) or Parquet image tables; see data.format.",
        ),
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Where the manifests go.")] = None,
    score: Annotated[str | None, typer.Option(help="el2n | grand | forgetting | prototype | none")] = None,
    policy: Annotated[
        str | None,
        typer.Option(help="keep-hard | offset | keep-easy | class-balanced | stratified | random | none"),
    ] = None,
    keep: Annotated[float | None, typer.Option(help="Fraction of images kept (0, 1].")] = None,
    export: Annotated[
        str | None,
        typer.Option(
            help="webdataset | parquet | none: also write the kept images (original bytes, with sha256 and "
            "scores per sample) as shards of about export.shard_mib MiB into OUTPUT/runs/<run_id>/export/, named "
            "kept-000000.tar ... (or .parquet), for timm, litdata, mosaic streaming or `maskdiet run --input`.",
        ),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Read, decode, score and prune images; write OUTPUT/manifest.parquet and OUTPUT/quarantine.parquet."""
    from pipeline.core.results import write_result
    from pipeline.core.runtime import ray_session
    from pipeline.curate import curate as run_curate
    from stages.formats import check_input

    with command_context(verbose):
        cfg = make_config(
            config,
            set_,
            data__input=input_url,
            output=output,
            score__method=score,
            prune__policy=policy,
            prune__keep=keep,
            export__format=export,
        )
        cfg = keep_flag_wins(cfg, keep, set_)
        if not cfg.data.input:
            raise ConfigError("no input: pass --input URL or set data.input")
        # a missing bucket or bad credentials fail here, in a second, not after Ray has started
        check_input(cfg.data)
        with ray_session(cfg.ray), progress_display() as progress:
            result = run_curate(cfg, progress=progress)  # type: ignore[arg-type]
        outputs = {
            "manifest": result.manifest_url,
            "quarantine": result.quarantine_url,
            "run_dir": result.run_dir,
        }
        if result.export is not None:
            outputs["export"] = result.export.pattern
        write_result(
            cfg.output,
            {"command": "curate", "run_id": result.run_id, "outputs": outputs},
            cfg.data.storage_options,
        )
    print_counts("curate", result.counts)
    if result.manifest["score"].notna().any():
        print_score_summary(result.manifest, cfg.score.method)
    console.print(
        f"{len(result.manifest)} images in the manifest ({int(result.manifest['kept'].sum())} kept), "
        f"{len(result.quarantine)} quarantined, {result.images_per_second:.0f} images/s\n"
        f"manifest: {result.manifest_url}\nquarantine: {result.quarantine_url}"
    )
    if result.export is not None:
        exported = result.export
        skipped = f", {exported.skipped} skipped (gone or changed since curation)" if exported.skipped else ""
        console.print(  # soft wrap: the pattern stays one piece to copy, however narrow the terminal
            f"export: {exported.samples} images in {len(exported.shards)} {exported.format} shards "
            f"({exported.bytes / 2**20:.1f} MiB){skipped}\nshards: {exported.pattern}",
            soft_wrap=True,
        )


# ---------------------------------------------------------------------------------------------- pretrain, evaluate
