"""`maskdiet schedule`: recurring runs submitted as Ray jobs, their history and Kubernetes export."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import (
    AddressOption,
    ConfigOption,
    SetOption,
    VerboseOption,
    app,
    command_context,
    console,
    make_config,
    override_key,
)

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
    from pipeline.ops.schedule_state import state_url_from

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

    from pipeline.ops.schedule_policy import add_schedule, next_slot
    from pipeline.ops.schedule_state import utcnow

    with command_context(verbose):
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
    from pipeline.ops.schedule_policy import next_slot
    from pipeline.ops.schedule_state import load_state, utcnow

    with command_context(verbose):
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
    from pipeline.ops.schedule_policy import remove_schedule

    with command_context(verbose):
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
    from pipeline.ops.schedule_policy import RayJobsSubmitter, history

    with command_context(verbose):
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

    from pipeline.ops.schedule_policy import run_due

    with command_context(verbose):
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
    from pipeline.ops.schedule_policy import serve

    with command_context(verbose):
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
    from pipeline.core.storage import atomic_write_bytes
    from pipeline.ops.schedule_export import DEFAULT_IMAGE, export_manifest
    from pipeline.ops.schedule_state import get_schedule, load_state

    with command_context(verbose):
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
