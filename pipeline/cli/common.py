"""What every `maskdiet` command shares: the app, the common options, the error contract, config loading
and the progress display. Each command module (data, train, run, sweep, jobs, schedule) is a thin shell
over a library function.

Every command takes `--config FILE` and repeated `--set dotted.key=value`; every URL is an fsspec URL.
A `MaskdietError` (bad config, missing bucket, bad input) prints one line naming the fix, exit code 2;
anything else is a bug and shows its traceback with `-v` (see `command_context`).
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

from pipeline.core.config import Config, ConfigError, load_config, nest_dotted, override_key
from pipeline.core.errors import MaskdietError

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
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Jobs API URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then http://127.0.0.1:8265).",
    ),
]


@contextlib.contextmanager
def command_context(verbose: bool) -> Iterator[None]:
    """The frame of every command: logging at the asked level, then the error contract.

    A `MaskdietError` (bad config, URL, input, cluster address: something the user can fix) prints as one
    red line with exit code 2. Any other exception is a bug in maskdiet: one line that says so and exit
    code 1, or its full traceback with `-v`."""
    setup_logging(verbose)
    try:
        yield
    except MaskdietError as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as e:
        if verbose:
            raise
        console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {e}\n"
            "This is a bug in maskdiet; rerun with -v for the traceback and report it."
        )
        raise typer.Exit(1) from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


def loss_change(first: float, final: float) -> str:
    """ "first → final" of a run's logged loss; one value when the run logged one line (fewer steps than
    `pretrain.log_every`), rather than the same number twice as if nothing had trained."""
    return f"{final:.4f}" if first == final else f"{first:.4f} → {final:.4f}"


def keep_flag_wins(cfg: Config, keep: float | None, overrides: list[str] | None) -> Config:
    """`--keep F` is the fraction kept even when the file sets `prune.keep_count` (which otherwise wins over
    `prune.keep`); only a `--set prune.keep_count=N` on the same command line keeps the count."""
    if keep is None or cfg.prune.keep_count is None:
        return cfg
    if any(override_key(o) == "prune.keep_count" for o in overrides or []):
        return cfg
    return cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"keep_count": None})})


def one_config(positional: str | None, option: str | None) -> str | None:
    """The config file given as the CONFIG argument or as --config; both at once is an error, not a choice."""
    if positional and option and positional != option:
        raise ConfigError(f"two config files ({positional} and --config {option}): give one")
    return positional or option


def make_config(config: str | None, overrides: list[str] | None, **flags: object) -> Config:
    """Defaults ← FILE ← command-line flags ← --set: a flag given on the command line wins over the file.

    `flags` name config keys with `__` for the dots (`pretrain__steps=20`); one left as None was not given."""
    given = {key.replace("__", "."): value for key, value in flags.items() if value is not None}
    return load_config(config, overrides or [], flags=nest_dotted(given))


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
