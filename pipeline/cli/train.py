"""`maskdiet pretrain and evaluate`: masked-autoencoder pretraining on Ray Train; frozen-encoder probes."""

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
    loss_change,
    make_config,
    progress_display,
)


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
    from pipeline.core.results import write_result
    from pipeline.core.runtime import ray_session
    from pipeline.core.storage import check_readable
    from pipeline.models.mae import size_of
    from pipeline.ops.jobs import current_submission_id
    from pipeline.train import pretrain as run_pretrain

    with command_context(verbose):
        cfg = make_config(config, set_, output=output, pretrain__steps=steps, pretrain__num_workers=workers)
        size_of(cfg)  # before Ray starts
        check_readable(manifest, cfg.data.storage_options)
        name = run_name or current_submission_id() or "pretrain"
        with ray_session(cfg.ray), progress_display() as progress:
            result = run_pretrain(cfg, manifest, cfg.output, run_name=name, progress=progress)  # type: ignore[arg-type]
        outputs = {
            "encoder": result.encoder_url,
            "metrics": result.metrics_url,
            "checkpoint": result.checkpoint,
        }
        write_result(
            cfg.output,
            {"command": "pretrain", "run_id": result.run_name, "outputs": outputs},
            cfg.data.storage_options,
        )
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

    with command_context(verbose):
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
