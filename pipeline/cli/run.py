"""`maskdiet run and report`: the whole pipeline in one command; a run directory's report."""

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
    load_config,
    loss_change,
    make_config,
    one_config,
    progress_display,
)

# ---------------------------------------------------------------------------------------------- run, report

DEMO_SPEC = {"per_class": 200, "noise": 0.1, "bad": 10, "seed": 0}


def _ensure_demo_data(url: str, storage_options: dict) -> None:
    """Generate the demo images at `url` unless they are already there."""
    from pipeline.core.runs import TRUTH_NAME
    from pipeline.core.storage import exists, join
    from pipeline.demo_data import DemoSpec, write_demo_data

    if exists(join(url, TRUTH_NAME), storage_options):
        return
    console.print(f"generating demo images in {url} ...")
    write_demo_data(url, DemoSpec(**DEMO_SPEC), storage_options)


def _accuracy(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def evaluation_rows(summary: dict) -> list[tuple[str, str]]:
    """A header row, then one row per protocol: pretrained / random init / raw pixels, so the encoder is
    read against both baselines (raw pixels have no fine-tune: "-")."""
    rows = []
    for protocol, key in (("kNN", "knn"), ("linear probe", "probe"), ("fine-tune", "finetune")):
        if f"{key}_accuracy" in summary:
            values = (summary.get(f"{prefix}{key}_accuracy") for prefix in ("", "random_", "pixel_"))
            rows.append((f"  {protocol}", " / ".join(map(_accuracy, values))))
    return [("accuracy", "pretrained / random init / raw pixels"), *rows] if rows else []


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
    rows += evaluation_rows(summary)
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

    from pipeline.core.results import write_result
    from pipeline.core.runtime import ray_session
    from pipeline.run import run_pipeline

    with command_context(verbose):
        path = one_config(config_file, config)
        demo = path is None
        base = (
            yaml.safe_load(importlib.resources.files("pipeline.core").joinpath("demo.yaml").read_text())
            if demo
            else None
        )
        cfg = load_config(path, set_ or [], base=base)
        if not cfg.data.input:
            raise ConfigError("no input: set data.input in the config (an image folder URL)")
        from pipeline.models.mae import size_of

        size_of(cfg)  # before any image is read: the model settings would fail only at pretraining
        # compared after loading: the demo's relative input is resolved against the working folder
        if demo and cfg.data.input == load_config(None, base=base).data.input:
            # only into the demo's own folder: `run --set data.input=URL` reads that data as it is
            _ensure_demo_data(cfg.data.input, cfg.data.storage_options)
        with ray_session(cfg.ray), progress_display() as progress:
            result = run_pipeline(cfg, previous=previous, progress=progress)  # type: ignore[arg-type]
        outputs = {
            "run_dir": result.run_dir,
            "manifest": result.curate.manifest_url,
            "quarantine": result.curate.quarantine_url,
            "report": result.summary.get("report"),
        }
        write_result(
            result.run_dir,
            {"command": "run", "run_id": result.curate.run_id, "outputs": outputs, "summary": result.summary},
            cfg.data.storage_options,
        )
    print_run_summary(result.summary)


@app.command()
def report(
    run_dir: Annotated[
        str,
        typer.Argument(help="A run directory (OUTPUT/runs/<run_id>), or an output folder: its latest run."),
    ],
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write plots, index.html and summary.md for a run directory into RUN_DIR/report/."""
    from pipeline.core.runs import resolve_run
    from pipeline.report import write_report

    with command_context(verbose):
        cfg = make_config(config, set_)
        so = cfg.data.storage_options
        url = write_report(resolve_run(run_dir, so), so)
    console.print(f"report: {url}/index.html")
