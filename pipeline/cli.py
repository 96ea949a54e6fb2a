"""The `maskdiet` command line. Each command is a thin shell over a library function.

Every command takes `--config FILE` and repeated `--set dotted.key=value`; every URL is an fsspec URL.
Errors a user can fix (bad config, missing bucket, bad input) print one line naming the fix, exit code 2.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.config import Config, ConfigError, load_config

app = typer.Typer(
    name="maskdiet",
    help="Curate image data by difficulty (EL2N, GraNd, forgetting, prototypes) and pretrain masked image "
    "models on what is kept — on Ray, from a laptop to a cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOption = Annotated[
    str | None, typer.Option("--config", "-c", help="YAML config file (local path or fsspec URL).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set pretrain.steps=100 (repeatable)."),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details (INFO).")]

# Errors a user can fix: one line, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, PermissionError, ValueError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.storage import StorageError

    return (*USER_ERRORS, StorageError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can fix into one red line and exit code 2."""
    try:
        yield
    except _user_errors() as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


def make_config(config: str | None, overrides: list[str] | None, **base: object) -> Config:
    """Defaults ← FILE ← command-line flags ← --set."""
    nested: dict[str, object] = {}
    for dotted, value in base.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = value
    return load_config(config, overrides or [], base=nested)


@contextlib.contextmanager
def progress_display() -> Iterator[object]:
    """A rich progress display; yields a `progress(phase, done, total)` callback."""
    with Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        tasks: dict[str, object] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)  # type: ignore[arg-type]

        yield update


# ---------------------------------------------------------------------------------------------- demo-data


@app.command("demo-data")
def demo_data(
    output: Annotated[str, typer.Argument(help="Where to write the image folder (path or fsspec URL).")],
    noise: Annotated[float, typer.Option(help="Fraction of images moved to a wrong class folder.")] = 0.0,
    bad: Annotated[int, typer.Option(help="Number of bad files to add (empty, truncated, bombs, ...).")] = 0,
    classes: Annotated[str, typer.Option(help="Comma-separated sources: digits, shapes, photos.")] = "digits",
    per_class: Annotated[int, typer.Option(help="Images per class.")] = 200,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    image_format: Annotated[str, typer.Option("--format", help="png, jpg or mixed.")] = "mixed",
    seed: Annotated[int, typer.Option(help="Random seed (the output is deterministic).")] = 0,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write a labeled demo image folder (<class>/<file>) made offline, with optional label noise and bad
    files; the truth goes to _truth.parquet and _bad.parquet beside it."""
    from pipeline.demo_data import DemoSpec, write_demo_data

    setup_logging(verbose)
    with user_errors():
        cfg = make_config(config, set_)
        spec = DemoSpec(
            sources=tuple(s.strip() for s in classes.split(",") if s.strip()),
            per_class=per_class,
            size=size,
            noise=noise,
            bad=bad,
            image_format=image_format,
            seed=seed,
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


@app.command()
def curate(
    input_url: Annotated[
        str | None, typer.Option("--input", "-i", help="Image folder URL: <root>/<class>/<file>.")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Where the manifests go.")] = None,
    score: Annotated[str | None, typer.Option(help="el2n | grand | forgetting | prototype | none")] = None,
    policy: Annotated[
        str | None,
        typer.Option(help="keep-hard | offset | keep-easy | class-balanced | stratified | random"),
    ] = None,
    keep: Annotated[float | None, typer.Option(help="Fraction of images kept (0, 1].")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Read, decode, score and prune images; write OUTPUT/manifest.parquet and OUTPUT/quarantine.parquet."""
    from pipeline.curate import curate as run_curate
    from pipeline.runtime import ray_session

    setup_logging(verbose)
    with user_errors():
        cfg = make_config(
            config,
            set_,
            data__input=input_url,
            output=output,
            score__method=score,
            prune__policy=policy,
            prune__keep=keep,
        )
        if not cfg.data.input:
            raise ConfigError("no input: pass --input URL or set data.input")
        with ray_session(cfg.ray), progress_display() as progress:
            result = run_curate(cfg, progress=progress)  # type: ignore[arg-type]
    print_counts("curate", result.counts)
    console.print(
        f"{len(result.manifest)} images in the manifest ({int(result.manifest['kept'].sum())} kept), "
        f"{len(result.quarantine)} quarantined, {result.images_per_second:.0f} images/s\n"
        f"manifest: {result.manifest_url}\nquarantine: {result.quarantine_url}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
