"""`maskdiet sweep`: Ray Tune over the pretraining loop."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import (
    ConfigOption,
    SetOption,
    VerboseOption,
    app,
    command_context,
    console,
    make_config,
    one_config,
)

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
    from pipeline.core.results import write_result
    from pipeline.core.runtime import ray_session
    from tuning.space import build_search_space
    from tuning.sweep import run_sweep

    with command_context(verbose):
        cfg = make_config(one_config(config_file, config), set_, tune__name=name, tune__manifest=manifest)
        if not resume:
            build_search_space(cfg)  # a bad space fails here, before Ray starts
        with ray_session(cfg.ray):
            result = run_sweep(cfg, resume=resume, num_samples=num_samples, verbose=1 if verbose else 0)
        outputs = {
            "sweep_dir": result.sweep_dir,
            "results": result.results_url,
            "best_config": result.best_config_url,
            "plot": result.plot_url,
        }
        write_result(
            result.sweep_dir,
            {
                "command": "sweep",
                "run_id": result.sweep_dir.rstrip("/").rsplit("/", 1)[-1],
                "outputs": outputs,
                "unfinished_trials": result.unfinished,
            },
            cfg.data.storage_options,
        )
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
