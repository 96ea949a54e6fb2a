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

from pipeline.config import Config, ConfigError, load_config, override_key

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
    from pipeline.jobs import JobsError
    from pipeline.schedule import ScheduleError
    from pipeline.storage import StorageError

    return (*USER_ERRORS, StorageError, JobsError, ScheduleError)


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
    """Defaults ← FILE ← command-line flags ← --set: a flag given on the command line wins over the file."""
    nested: dict[str, object] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = value
    return load_config(config, overrides or [], flags=nested)


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
        str | None, typer.Option("--input", "-i", help="Image folder URL: <root>/<class>/<file>.")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Where the manifests go.")] = None,
    score: Annotated[str | None, typer.Option(help="el2n | grand | forgetting | prototype | none")] = None,
    policy: Annotated[
        str | None,
        typer.Option(help="keep-hard | offset | keep-easy | class-balanced | stratified | random | none"),
    ] = None,
    keep: Annotated[float | None, typer.Option(help="Fraction of images kept (0, 1].")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Read, decode, score and prune images; write OUTPUT/manifest.parquet and OUTPUT/quarantine.parquet."""
    from pipeline.curate import curate as run_curate
    from pipeline.runtime import ray_session
    from pipeline.storage import check_readable

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
        cfg = keep_flag_wins(cfg, keep, set_)
        if not cfg.data.input:
            raise ConfigError("no input: pass --input URL or set data.input")
        # a missing bucket or bad credentials fail here, in a second, not after Ray has started
        check_readable(cfg.data.input, cfg.data.storage_options)
        with ray_session(cfg.ray), progress_display() as progress:
            result = run_curate(cfg, progress=progress)  # type: ignore[arg-type]
    print_counts("curate", result.counts)
    if result.manifest["score"].notna().any():
        print_score_summary(result.manifest, cfg.score.method)
    console.print(
        f"{len(result.manifest)} images in the manifest ({int(result.manifest['kept'].sum())} kept), "
        f"{len(result.quarantine)} quarantined, {result.images_per_second:.0f} images/s\n"
        f"manifest: {result.manifest_url}\nquarantine: {result.quarantine_url}"
    )


# ---------------------------------------------------------------------------------------------- pretrain, evaluate


@app.command()
def pretrain(
    manifest: Annotated[str, typer.Option("--manifest", "-m", help="manifest.parquet URL (its kept rows).")],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Where checkpoints/, encoder.pth, metrics go.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (pretrain.steps).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers (pretrain.num_workers).")] = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint run name; the same name resumes. Default: pretrain, or inside a Ray job the job's "
            "submission id (each job, e.g. each slot of an exported RayCronJob, starts its own run)."
        ),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Pretrain a masked autoencoder on the manifest's kept images with Ray Train (streamed from storage);
    write OUTPUT/encoder.pth (timm ViT keys), OUTPUT/metrics.jsonl and OUTPUT/checkpoints/."""
    from pipeline.jobs import current_submission_id
    from pipeline.mae import size_of
    from pipeline.runtime import ray_session
    from pipeline.storage import check_readable
    from pipeline.train import pretrain as run_pretrain

    setup_logging(verbose)
    with user_errors():
        cfg = make_config(config, set_, output=output, pretrain__steps=steps, pretrain__num_workers=workers)
        size_of(cfg)  # before Ray starts
        check_readable(manifest, cfg.data.storage_options)
        name = run_name or current_submission_id() or "pretrain"
        with ray_session(cfg.ray), progress_display() as progress:
            result = run_pretrain(cfg, manifest, cfg.output, run_name=name, progress=progress)  # type: ignore[arg-type]
    table = Table(title=f"pretrain {cfg.pretrain.model}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
    for what, value in (
        ("steps", str(result.steps)),
        ("loss first → final", loss_change(result.first_loss, result.final_loss)),
        ("val loss", val),
        ("images/s", f"{result.images_per_s:.0f}"),
        ("wall time", f"{result.seconds:.0f} s"),
    ):
        table.add_row(what, value)
    console.print(table)
    console.print(
        f"encoder: {result.encoder_url}\nmetrics: {result.metrics_url}\ncheckpoint: {result.checkpoint}"
    )


@app.command()
def evaluate(
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="encoder.pth, a pretrain output folder or a checkpoint.")
    ],
    data: Annotated[str, typer.Option("--data", help="Labeled image folder (<class>/<file>) or manifest.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Frozen-encoder kNN and linear-probe accuracy on a labeled split, beside a randomly initialised
    encoder of the same size."""
    from pipeline.evaluate import evaluate_encoder

    setup_logging(verbose)
    with user_errors():
        cfg = make_config(config, set_)
        with console.status("extracting features and fitting probes ..."):
            result = evaluate_encoder(checkpoint, data, cfg)
    table = Table(title=f"evaluate {result.model} ({result.num_train} train / {result.num_test} test)")
    table.add_column("encoder")
    table.add_column(f"kNN (k={cfg.evaluate.knn_k})", justify="right")
    table.add_column("linear probe", justify="right")
    table.add_row("pretrained", f"{result.knn_accuracy:.3f}", f"{result.probe_accuracy:.3f}")
    table.add_row("random init", f"{result.random_knn_accuracy:.3f}", f"{result.random_probe_accuracy:.3f}")
    console.print(table)


# ---------------------------------------------------------------------------------------------- run, report

DEMO_SPEC = {"per_class": 200, "noise": 0.1, "bad": 10, "seed": 0}


def _ensure_demo_data(url: str, storage_options: dict) -> None:
    """Generate the demo images at `url` unless they are already there."""
    from pipeline.demo_data import DemoSpec, write_demo_data
    from pipeline.storage import exists, join

    if exists(join(url, "_truth.parquet"), storage_options):
        return
    console.print(f"generating demo images in {url} ...")
    write_demo_data(url, DemoSpec(**DEMO_SPEC), storage_options)


def print_run_summary(summary: dict) -> None:
    table = Table(title=f"maskdiet run {summary.get('run_id', '')}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("images read", summary.get("images_read")),
        ("quarantined", summary.get("quarantined")),
        ("kept / pruned", f"{summary.get('kept')} / {summary.get('pruned')}"),
        ("scored now / from cache", f"{summary.get('scored')} / {summary.get('cached')}"),
    ]
    if "noisy_total" in summary:
        rows.append(
            ("injected noisy labels pruned", f"{summary['noisy_pruned']} of {summary['noisy_total']}")
        )
    if "new_images" in summary:
        rows.append(("new since previous run", summary["new_images"]))
    if "first_loss" in summary:
        rows.append(
            (
                "pretraining loss",
                f"{loss_change(summary['first_loss'], summary['final_loss'])} ({summary['steps']} steps)",
            )
        )
    if "knn_accuracy" in summary:
        rows.append(
            (
                "kNN accuracy (random init)",
                f"{summary['knn_accuracy']:.3f} ({summary.get('random_knn_accuracy', float('nan')):.3f})",
            )
        )
    if "probe_accuracy" in summary:
        rows.append(
            (
                "linear probe (random init)",
                f"{summary['probe_accuracy']:.3f} ({summary.get('random_probe_accuracy', float('nan')):.3f})",
            )
        )
    rows.append(("wall time", f"{summary.get('seconds', 0):.0f} s"))
    for what, value in rows:
        table.add_row(what, str(value))
    console.print(table)
    console.print(f"run directory: {summary.get('run_dir')}")
    if summary.get("report"):
        console.print(f"report: {summary['report']}")


@app.command()
def run(
    config_file: Annotated[
        str | None, typer.Argument(metavar="[CONFIG]", help="YAML config; omit it for the embedded demo.")
    ] = None,
    previous: Annotated[
        str | None,
        typer.Option(help="Previous run dir (or 'latest'): reuse its scores; only new images are scored."),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """The whole pipeline: curate → pretrain → evaluate → report, into OUTPUT/runs/<run_id>/. With no CONFIG,
    the embedded demo: generated images (with label noise and bad files), local Ray, a tiny model."""
    import importlib.resources

    import yaml

    from pipeline.run import run_pipeline
    from pipeline.runtime import ray_session

    setup_logging(verbose)
    with user_errors():
        path = one_config(config_file, config)
        demo = path is None
        base = (
            yaml.safe_load(importlib.resources.files("pipeline").joinpath("demo.yaml").read_text())
            if demo
            else None
        )
        cfg = load_config(path, set_ or [], base=base)
        if not cfg.data.input:
            raise ConfigError("no input: set data.input in the config (an image folder URL)")
        from pipeline.mae import size_of

        size_of(cfg)  # before any image is read: the model settings would fail only at pretraining
        if demo and cfg.data.input == load_config(None, base=base).data.input:
            # only into the demo's own folder: `run --set data.input=URL` reads that data as it is
            _ensure_demo_data(cfg.data.input, cfg.data.storage_options)
        with ray_session(cfg.ray), progress_display() as progress:
            result = run_pipeline(cfg, previous=previous, progress=progress)  # type: ignore[arg-type]
    print_run_summary(result.summary)


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="A run directory (OUTPUT/runs/<run_id>).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write plots, index.html and summary.md for a run directory into RUN_DIR/report/."""
    from pipeline.report import write_report

    setup_logging(verbose)
    with user_errors():
        cfg = make_config(config, set_)
        url = write_report(run_dir, cfg.data.storage_options)
    console.print(f"report: {url}/index.html")


# ---------------------------------------------------------------------------------------------- sweep


def print_sweep_table(table: object, metric: str, limit: int = 20) -> None:
    """The trials, best first: objective, status and the axes users sweep most."""
    import pandas as pd

    assert isinstance(table, pd.DataFrame)
    out = Table(title=f"sweep trials by {metric} (best first)")
    wanted = ("trial_id", "objective", "step", "status", "mask_ratio", "ratio_end", "schedule")
    axes = ("mask_strategy", "lr", "batch_size", "policy", "keep")
    columns = [c for c in (*wanted, *axes) if c in table.columns]
    for column in columns:
        out.add_column(metric if column == "objective" else column, justify="left")
    for _, row in table.head(limit).iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if isinstance(value, float):
                cells.append("" if pd.isna(value) else f"{value:.4g}")
            else:
                cells.append("" if value is None else str(value))
        out.add_row(*cells)
    console.print(out)


@app.command()
def sweep(
    config_file: Annotated[
        str | None, typer.Argument(metavar="[CONFIG]", help="YAML config with a tune.space section.")
    ] = None,
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", "-n", help="Trials to draw (times the grid, if any).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the latest sweep (or --name); errored trials rerun.")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Sweep name (folder under tune.output).")] = None,
    manifest: Annotated[
        str | None, typer.Option(help="Scored manifest every trial prunes from (skips curation).")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Sweep pretraining with Ray Tune (ASHA by default) over tune.space: mask ratio and schedule, mask
    strategy, LR, batch size, prune policy and keep fraction. Writes results.parquet, best.yaml and a plot
    of the objective against mask ratio into OUTPUT/sweeps/<name>/."""
    from pipeline.runtime import ray_session
    from tuning.space import build_search_space
    from tuning.sweep import run_sweep

    setup_logging(verbose)
    with user_errors():
        cfg = make_config(one_config(config_file, config), set_, tune__name=name, tune__manifest=manifest)
        if not resume:
            build_search_space(cfg)  # a bad space fails here, before Ray starts
        with ray_session(cfg.ray):
            result = run_sweep(cfg, resume=resume, num_samples=num_samples, verbose=1 if verbose else 0)
    print_sweep_table(result.table, result.metric)
    console.print(
        f"{len(result.table)} trials ({result.stopped_early} stopped early) in {result.seconds:.0f} s\n"
        f"results: {result.results_url}\nbest config: {result.best_config_url}\nplot: {result.plot_url}"
    )
    if result.unfinished:
        name = result.sweep_dir.rstrip("/").rsplit("/", 1)[-1]
        console.print(
            f"[yellow]interrupted:[/] {result.unfinished} trial(s) unfinished; continue with "
            f"maskdiet sweep {config_file or config or ''} --resume --name {name}"
        )
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- jobs

jobs_app = typer.Typer(
    help="Run maskdiet commands as Ray Jobs on a running cluster (Jobs API at the dashboard, port 8265). "
    "Token auth: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; the token is never printed.",
    no_args_is_help=True,
)
app.add_typer(jobs_app, name="jobs")

AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Jobs API URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then http://127.0.0.1:8265).",
    ),
]


def _job_table(states: list) -> Table:
    import datetime as dt

    table = Table()
    for col in ("submission id", "status", "started (UTC)", "entrypoint"):
        table.add_column(col)
    for s in states:
        started = (
            dt.datetime.fromtimestamp(s.start_time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            if s.start_time
            else ""
        )
        table.add_row(s.submission_id, s.status, started, s.entrypoint)
    return table


@jobs_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def jobs_submit(
    command: Annotated[
        list[str], typer.Argument(help="The command, after `--`: -- maskdiet curate --input URL ...")
    ],
    address: AddressOption = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="Config for the command: a local file (shipped with the job) "
            "or an object-store URL (passed as is).",
        ),
    ] = None,
    submission_id: Annotated[
        str | None, typer.Option(help="Job id (default: generated). Reusing one is refused by Ray.")
    ] = None,
    pip: Annotated[list[str] | None, typer.Option(help="Extra pip package for the job (repeatable).")] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE, or KEY to copy from this shell (repeatable; values never printed)."),
    ] = None,
    follow: Annotated[bool, typer.Option(help="Stream the logs until the job ends.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait until the job ends; exit 1 unless it SUCCEEDED.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Submit a maskdiet command as a Ray job; prints its submission id on stdout."""
    import os

    from pipeline import jobs

    setup_logging(verbose)
    with user_errors():
        env_vars: dict[str, str] = {}
        for item in env or []:
            key, sep, value = item.partition("=")
            if not sep:
                if key not in os.environ:
                    raise ValueError(f"--env {key}: not set in this shell (give KEY=VALUE)")
                value = os.environ[key]
            env_vars[key] = value
        client = jobs.connect(address)
        sid = jobs.submit(
            client, command, config=config, submission_id=submission_id, pip=pip or (), env_vars=env_vars
        )
        console.print(f"submitted [bold]{sid}[/] to {client.get_address()}")
        typer.echo(sid)
        if follow:
            for chunk in jobs.follow_logs(client, sid):
                typer.echo(chunk, nl=False)
        if follow or wait:
            status = jobs.wait_for(client, sid, timeout=7 * 24 * 3600)
            console.print(f"{sid}: [bold]{status}[/]")
            if status != "SUCCEEDED":
                raise typer.Exit(1)


@jobs_app.command("status")
def jobs_status(
    submission_id: Annotated[str, typer.Argument(help="The job's submission id.")],
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Show a job's state, its message and where its outputs are (run directory, manifest) when known."""
    from pipeline import jobs

    setup_logging(verbose)
    with user_errors():
        state = jobs.job_status(jobs.connect(address), submission_id)
    table = Table(title=f"job {state.submission_id}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("status", state.status)
    table.add_row("entrypoint", state.entrypoint)
    if state.message:
        table.add_row("message", state.message)
    if state.run_dir:
        table.add_row("run directory", state.run_dir)
    for key, value in sorted(state.outputs.items()):
        if key not in ("run directory", "run dir"):
            table.add_row(key, value)
    console.print(table)
    typer.echo(state.status)


@jobs_app.command("logs")
def jobs_logs(
    submission_id: Annotated[str, typer.Argument(help="The job's submission id.")],
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Print a job's logs (driver output); with --follow, stream them as they are written."""
    from pipeline import jobs

    setup_logging(verbose)
    with user_errors():
        client = jobs.connect(address)
        if follow:
            for chunk in jobs.follow_logs(client, submission_id):
                typer.echo(chunk, nl=False)
        else:
            typer.echo(jobs.job_logs(client, submission_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(
    submission_id: Annotated[str, typer.Argument(help="The job's submission id.")],
    address: AddressOption = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the job to end.")] = 30.0,
    verbose: VerboseOption = False,
) -> None:
    """Stop a running job (SIGTERM to its driver, then SIGKILL)."""
    from pipeline import jobs

    setup_logging(verbose)
    with user_errors():
        status = jobs.stop(jobs.connect(address), submission_id, wait=wait)
    console.print(f"{submission_id}: [bold]{status}[/]")
    typer.echo(status)


@jobs_app.command("list")
def jobs_list(address: AddressOption = None, verbose: VerboseOption = False) -> None:
    """List the cluster's jobs, oldest first."""
    from pipeline import jobs

    setup_logging(verbose)
    with user_errors():
        states = jobs.list_jobs(jobs.connect(address))
    console.print(_job_table(states))
    for state in states:  # one line per job on stdout, for scripts
        typer.echo(f"{state.submission_id} {state.status}")


# ---------------------------------------------------------------------------------------------- schedule

schedule_app = typer.Typer(
    help="Recurring maskdiet runs (cron, UTC) submitted as Ray jobs, with history; `run-due` for system cron "
    "or a Kubernetes CronJob, `serve` as a long-running scheduler, `export` for KubeRay manifests.",
    no_args_is_help=True,
)
app.add_typer(schedule_app, name="schedule")

StateOption = Annotated[
    str | None,
    typer.Option(
        "--state",
        help="Schedule state (a JSON object at any URL). Default: schedule.state from --config, then "
        "MASKDIET_SCHEDULE_STATE, then ~/.maskdiet/schedules.json.",
    ),
]


def _schedule_context(config: str | None, set_: list[str] | None, state: str | None) -> tuple[str, dict]:
    """The state URL and the storage options to reach it."""
    from pipeline.schedule import state_url_from

    cfg = make_config(config, set_)
    return state_url_from(cfg.schedule.state, state), cfg.data.storage_options


def _runs_table(title: str, runs: list) -> Table:
    table = Table(title=title)
    for col in ("due (UTC)", "submission id", "outcome", "status", "message"):
        table.add_column(col)
    for r in runs:
        table.add_row(r.due, r.submission_id, r.outcome, r.status, r.message)
    return table


@schedule_app.command("add")
def schedule_add(
    name: Annotated[str, typer.Argument(help="Schedule name: lower-case letters, digits, '-'.")],
    cron: Annotated[str, typer.Option(help="Cron expression in UTC, e.g. '0 3 * * *' (nightly at 03:00).")],
    config: Annotated[
        str,
        typer.Option("--config", "-c", help="The scheduled run's config (object-store URL or local file)."),
    ],
    address: AddressOption = None,
    command: Annotated[
        str, typer.Option(help="The command each slot runs (--config is added).")
    ] = "maskdiet run --previous latest",
    concurrency: Annotated[
        str | None, typer.Option(help="skip | queue | replace (default: schedule.concurrency).")
    ] = None,
    catch_up: Annotated[
        str | None, typer.Option(help="once | all | none (default: schedule.catch_up).")
    ] = None,
    state: StateOption = None,
    replace: Annotated[bool, typer.Option(help="Redefine an existing schedule of that name.")] = False,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Add a schedule; its first run is at the first cron slot from now."""
    import shlex

    from pipeline.schedule import add_schedule, next_slot, utcnow

    setup_logging(verbose)
    with user_errors():
        cfg = make_config(config, set_)
        state_url, so = _schedule_context(config, set_, state)
        run_sets = run_overrides(set_)
        sched = add_schedule(
            state_url,
            name,
            cron,
            config,
            address=address,
            command=[*shlex.split(command), *(t for s in run_sets for t in ("--set", s))],
            concurrency=concurrency or cfg.schedule.concurrency,
            catch_up=catch_up or cfg.schedule.catch_up,
            misfire_grace_s=cfg.schedule.misfire_grace_s,
            replace=replace,
            storage_options=so,
        )
    console.print(
        f"schedule [bold]{sched.name}[/] ({sched.cron} UTC, concurrency={sched.concurrency}, "
        f"catch-up={sched.catch_up}) in {state_url}; next run {next_slot(sched, utcnow()):%Y-%m-%d %H:%M} UTC"
    )


def run_overrides(sets: list[str] | None) -> list[str]:
    """The `schedule add --set` values that travel with each slot's command: not `schedule.*` (the
    schedule's own), not `run_id` (each slot's is its submission id), and never `data.storage_options.*`:
    they would be written into the state file and every job's entrypoint (a scheduled run takes its
    credentials from its environment)."""
    keep = []
    for assignment in sets or []:
        key = override_key(assignment)
        if key.startswith("data.storage_options"):
            console.print(
                f"[yellow]note:[/] --set {key}=… opens the state file only; scheduled runs take their "
                "credentials from their environment"
            )
        elif not key.startswith("schedule.") and key != "run_id":
            keep.append(assignment)
    return keep


@schedule_app.command("list")
def schedule_list(
    state: StateOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """List schedules with their next slot and last outcome."""
    from pipeline.schedule import load_state, next_slot, utcnow

    setup_logging(verbose)
    with user_errors():
        state_url, so = _schedule_context(config, set_, state)
        st = load_state(state_url, so)
    table = Table(title=f"schedules in {state_url}")
    for col in ("name", "cron (UTC)", "next", "concurrency", "catch-up", "last run", "config"):
        table.add_column(col)
    now = utcnow()
    for s in st.schedules.values():
        runs = st.runs(s.name)
        last = f"{runs[-1].outcome} {runs[-1].status}".strip() if runs else ""
        table.add_row(
            s.name, s.cron, f"{next_slot(s, now):%Y-%m-%d %H:%M}", s.concurrency, s.catch_up, last, s.config
        )
    console.print(table)


@schedule_app.command("remove")
def schedule_remove(
    name: Annotated[str, typer.Argument(help="Schedule name.")],
    state: StateOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Remove a schedule (its history is kept)."""
    from pipeline.schedule import remove_schedule

    setup_logging(verbose)
    with user_errors():
        state_url, so = _schedule_context(config, set_, state)
        remove_schedule(state_url, name, so)
    console.print(f"removed schedule {name}")


@schedule_app.command("history")
def schedule_history(
    name: Annotated[str, typer.Argument(help="Schedule name.")],
    refresh: Annotated[bool, typer.Option(help="Ask the cluster for unfinished runs' status.")] = True,
    state: StateOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Every slot of a schedule and what happened: submitted (with the job's status), skipped, missed, ..."""
    from pipeline.schedule import RayJobsSubmitter, history

    setup_logging(verbose)
    with user_errors():
        state_url, so = _schedule_context(config, set_, state)
        runs = history(state_url, name, submitter=RayJobsSubmitter() if refresh else None, storage_options=so)
    console.print(_runs_table(f"history of {name}", runs))


@schedule_app.command("run-due")
def schedule_run_due(
    only: Annotated[str | None, typer.Option(help="Only this schedule.")] = None,
    now: Annotated[
        str | None, typer.Option(help="Pretend it is this ISO time (UTC), e.g. to backfill a slot.")
    ] = None,
    state: StateOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Submit whatever is due, record it, exit (for system cron or a Kubernetes CronJob). Exit 1 if a
    submission failed (it is retried, with the same id, by the next run-due)."""
    import datetime as dt

    from pipeline.schedule import run_due

    setup_logging(verbose)
    with user_errors():
        state_url, so = _schedule_context(config, set_, state)
        when = dt.datetime.fromisoformat(now) if now else None
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        runs = run_due(state_url, now=when, only=only, storage_options=so)
    console.print(_runs_table("run-due", runs) if runs else "nothing due")
    for r in runs:  # one line per slot on stdout, for scripts and CronJob logs
        typer.echo(f"{r.submission_id} {r.outcome} {r.status}".rstrip())
    if any(r.outcome == "failed" for r in runs):
        raise typer.Exit(1)


@schedule_app.command("serve")
def schedule_serve(
    max_wait: Annotated[float, typer.Option(help="Seconds between checks at most.")] = 60.0,
    state: StateOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the scheduler in the foreground until interrupted."""
    from pipeline.schedule import serve

    setup_logging(verbose)
    with user_errors():
        state_url, so = _schedule_context(config, set_, state)
        console.print(f"scheduler on {state_url}; Ctrl-C to stop")
        try:
            for runs in serve(state_url, max_wait_s=max_wait, storage_options=so):
                if runs:
                    console.print(_runs_table("run-due", runs))
        except KeyboardInterrupt:
            console.print("scheduler stopped")


@schedule_app.command("export")
def schedule_export(
    name: Annotated[str, typer.Argument(help="Schedule name.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="raycronjob | k8s-cronjob | rayjob")],
    image: Annotated[str | None, typer.Option(help="Container image built from infra/Dockerfile.")] = None,
    namespace: Annotated[str | None, typer.Option(help="Kubernetes namespace.")] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    state: StateOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write the Kubernetes manifest for a schedule (apply it with kubectl apply -f)."""
    from pipeline.schedule import DEFAULT_IMAGE, export_manifest, get_schedule, load_state
    from pipeline.storage import atomic_write_bytes

    setup_logging(verbose)
    with user_errors():
        state_url, so = _schedule_context(config, set_, state)
        sched = get_schedule(load_state(state_url, so), name)
        text = export_manifest(
            sched, fmt, image=image or DEFAULT_IMAGE, state_url=state_url, namespace=namespace
        )
        if output:
            atomic_write_bytes(output, text.encode(), so)
            console.print(f"wrote {output}")
        else:
            typer.echo(text, nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
