"""`maskdiet jobs`: maskdiet commands as Ray Jobs on a running cluster."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import (
    AddressOption,
    ConfigError,
    VerboseOption,
    app,
    command_context,
    console,
)

# ---------------------------------------------------------------------------------------------- jobs

jobs_app = typer.Typer(
    help="Run maskdiet commands as Ray Jobs on a running cluster (Jobs API at the dashboard, port 8265). "
    "Token auth: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; the token is never printed.",
    no_args_is_help=True,
)
app.add_typer(jobs_app, name="jobs")


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

    from pipeline.ops import jobs

    with command_context(verbose):
        env_vars: dict[str, str] = {}
        for item in env or []:
            key, sep, value = item.partition("=")
            if not sep:
                if key not in os.environ:
                    raise ConfigError(f"--env {key}: not set in this shell (give KEY=VALUE)")
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
    from pipeline.ops import jobs

    with command_context(verbose):
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
        if key != "run_dir":
            table.add_row(key, value)
    if state.outputs_note:
        table.add_row("outputs", state.outputs_note)
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
    from pipeline.ops import jobs

    with command_context(verbose):
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
    from pipeline.ops import jobs

    with command_context(verbose):
        status = jobs.stop(jobs.connect(address), submission_id, wait=wait)
    console.print(f"{submission_id}: [bold]{status}[/]")
    typer.echo(status)


@jobs_app.command("list")
def jobs_list(address: AddressOption = None, verbose: VerboseOption = False) -> None:
    """List the cluster's jobs, oldest first."""
    from pipeline.ops import jobs

    with command_context(verbose):
        states = jobs.list_jobs(jobs.connect(address))
    console.print(_job_table(states))
    for state in states:  # one line per job on stdout, for scripts
        typer.echo(f"{state.submission_id} {state.status}")
