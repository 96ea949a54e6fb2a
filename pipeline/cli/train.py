"""`maskdiet pretrain and evaluate`: masked-autoencoder pretraining on Ray Train; frozen-encoder probes."""

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
    loss_change,
    make_config,
    progress_display,
)


@app.command()
def pretrain(
    manifest: Annotated[
        str,
        typer.Option(
            "--manifest",
            "-m",
            help="manifest.parquet URL (its kept rows), or a curate/run output folder: its latest run's manifest.",
        ),
    ],
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
    from pipeline.core.runs import resolve_run
    from pipeline.core.runtime import ray_session
    from pipeline.core.storage import check_readable, join
    from pipeline.models.mae import size_of
    from pipeline.ops.jobs import current_submission_id
    from pipeline.tracking import tracked
    from pipeline.train import pretrain as run_pretrain
    from stages.manifest import MANIFEST_NAME

    with command_context(verbose):
        cfg = make_config(config, set_, output=output, pretrain__steps=steps, pretrain__num_workers=workers)
        size_of(cfg)  # before Ray starts
        check_readable(manifest, cfg.data.storage_options)
        if not manifest.endswith(".parquet"):  # a folder: the manifest of the run it publishes
            manifest = join(resolve_run(manifest, cfg.data.storage_options), MANIFEST_NAME)
        name = run_name or current_submission_id() or "pretrain"
        so = cfg.data.storage_options
        with (
            tracked(cfg.tracking, name, key=join(cfg.output, name), storage_options=so) as tracker,
            ray_session(cfg.ray),
            progress_display() as progress,
        ):
            tracker.log_config(cfg)
            result = run_pretrain(
                cfg,
                manifest,
                cfg.output,
                run_name=name,
                progress=progress,  # type: ignore[arg-type]
                on_metrics=tracker.log_metrics,
            )
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
        ("first step after", _seconds(result.first_step_seconds)),
        ("wall time", f"{result.seconds:.0f} s"),
    ):
        table.add_row(what, value)
    console.print(table)
    console.print(
        f"encoder: {result.encoder_url}\nmetrics: {result.metrics_url}\ncheckpoint: {result.checkpoint}"
    )


def _seconds(value: float | None) -> str:
    return f"{value:.1f} s" if value is not None else "-"


@app.command()
def evaluate(
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="encoder.pth, a pretrain output folder or a checkpoint.")
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Labeled image folder (<class>/<file>) or manifest; default evaluate.data, then data.input. "
            "Demo truth (_truth.parquet) beside the images gives the true labels.",
        ),
    ] = None,
    test_data: Annotated[
        str | None,
        typer.Option(
            "--test-data",
            help="A separate labeled test folder, e.g. an official test split (evaluate.test_data).",
        ),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    verbose: VerboseOption = False,
) -> None:
    """kNN, linear-probe and fine-tune accuracy of the encoder on a labeled split, beside the same
    architecture at its random initialisation and the raw pixels (kNN and probe)."""
    from pipeline.evaluate import evaluate_encoder

    with command_context(verbose):
        cfg = make_config(config, set_, evaluate__test_data=test_data)
        url = data or cfg.evaluate.data or cfg.data.input
        if not url:
            raise ConfigError("no labeled images: pass --data URL or set evaluate.data")
        with console.status("extracting features, fitting probes and fine-tuning ..."):
            result = evaluate_encoder(checkpoint, url, cfg)
    print_evaluation(result.as_dict(), cfg.evaluate.knn_k)


def _accuracy(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def print_evaluation(evaluation: dict, knn_k: int) -> None:
    """One row per representation (pretrained, random init, raw pixels), one column per protocol."""
    title = (
        f"evaluate {evaluation['model']} ({evaluation['num_train']} train / {evaluation['num_test']} test, "
        f"{evaluation.get('test', 'holdout')}; labels: {evaluation.get('labels', 'folder names')})"
    )
    table = Table(title=title)
    table.add_column("representation")
    table.add_column(f"kNN (k={knn_k})", justify="right")
    table.add_column("linear probe", justify="right")
    table.add_column("fine-tune", justify="right")
    for name, prefix in (("pretrained", ""), ("random init", "random_"), ("raw pixels", "pixel_")):
        table.add_row(
            name,
            _accuracy(evaluation.get(f"{prefix}knn_accuracy")),
            _accuracy(evaluation.get(f"{prefix}probe_accuracy")),
            _accuracy(evaluation.get(f"{prefix}finetune_accuracy")),
        )
    console.print(table)
