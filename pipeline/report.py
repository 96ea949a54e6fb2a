"""Run report: PNG plots plus `index.html` and `summary.md` that tie them together.

Reads what a run directory holds — `manifest.parquet`, `quarantine.parquet`, `metrics.jsonl`,
`evaluation.json`, `summary.json` — and writes `report/` beside them (any fsspec URL). Each plot is skipped,
with a note in the summary, when its input is missing (e.g. `curate --score none` has no scores to plot).
"""

from __future__ import annotations

import html
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipeline.core.runs import METRICS_NAME
from pipeline.core.storage import (
    StorageError,
    atomic_write_bytes,
    exists,
    join,
    read_bytes,
    read_json_lines,
)
from stages.decode import BadImage, DecodeOptions, decode_image
from stages.manifest import MANIFEST_NAME, QUARANTINE_NAME, read_table

log = logging.getLogger(__name__)


@dataclass
class RunArtifacts:
    """What a run directory holds; any part may be missing."""

    manifest: pd.DataFrame | None = None
    quarantine: pd.DataFrame | None = None
    metrics: pd.DataFrame | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def load_artifacts(run_dir: str, storage_options: dict[str, Any] | None = None) -> RunArtifacts:
    out = RunArtifacts()
    so = storage_options
    if exists(join(run_dir, MANIFEST_NAME), so):
        out.manifest = read_table(join(run_dir, MANIFEST_NAME), so)[0]
    if exists(join(run_dir, QUARANTINE_NAME), so):
        out.quarantine = read_table(join(run_dir, QUARANTINE_NAME), so)[0]
    rows = read_json_lines(join(run_dir, METRICS_NAME), so)
    out.metrics = pd.DataFrame(rows) if rows else None
    for name in ("evaluation", "summary"):
        url = join(run_dir, f"{name}.json")
        if exists(url, so):
            setattr(out, name, json.loads(read_bytes(url, so)))
    return out


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_score_histograms(manifest: pd.DataFrame) -> bytes | None:
    """One panel per class: score histogram, kept vs pruned stacked, so the prune thresholds are visible."""
    scored = manifest[manifest["score"].notna()]
    if scored.empty:
        return None
    classes = sorted(scored["class_name"].unique())
    cols = min(5, len(classes))
    rows = int(np.ceil(len(classes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    bins = np.linspace(scored["score"].min(), scored["score"].max(), 25)
    for ax, name in zip(axes.flat, classes, strict=False):
        part = scored[scored["class_name"] == name]
        ax.hist(
            [part.loc[part["kept"], "score"], part.loc[~part["kept"], "score"]],
            bins=bins,
            stacked=True,
            color=["#2b8cbe", "#e34a33"],
            label=["kept", "pruned"],
        )
        ax.set_title(f"{name} (n={len(part)})", fontsize=9)
    for ax in axes.flat[len(classes) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("difficulty score (higher = harder)")
    fig.supylabel("images")
    fig.suptitle("Score per class: kept (blue) vs pruned (red)")
    return _png(fig)


def _thumbnails(paths: list[str], storage_options: dict[str, Any] | None, size: int = 48) -> list[np.ndarray]:
    options = DecodeOptions(image_size=size)
    out = []
    for path in paths:
        try:
            out.append(decode_image(read_bytes(path, storage_options), options))
        except (BadImage, OSError, StorageError):  # gone or unreadable since the manifest was written
            out.append(np.zeros((size, size, 3), dtype=np.uint8))
    return out


def plot_example_grids(
    manifest: pd.DataFrame, storage_options: dict[str, Any] | None, per_row: int = 8
) -> bytes | None:
    """Rows of thumbnails: the hardest pruned, the hardest kept, the easiest kept, the easiest pruned."""
    scored = manifest[manifest["score"].notna()].sort_values("score", ascending=False)
    if scored.empty:
        return None
    kept, pruned = scored[scored["kept"]], scored[~scored["kept"]]
    groups = [
        ("hardest pruned", pruned.head(per_row)),
        ("hardest kept", kept.head(per_row)),
        ("easiest kept", kept.tail(per_row)),
        ("easiest pruned", pruned.tail(per_row)),
    ]
    groups = [(title, part) for title, part in groups if not part.empty]
    fig, axes = plt.subplots(len(groups), per_row, figsize=(1.3 * per_row, 1.55 * len(groups)), squeeze=False)
    for r, (title, part) in enumerate(groups):
        images = _thumbnails(part["path"].tolist(), storage_options)
        for c in range(per_row):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                row = part.iloc[c]
                ax.imshow(images[c])
                ax.set_title(f"{row['class_name']}\n{row['score']:.2f}", fontsize=7)
        axes[r, 0].text(
            -0.15, 0.5, title, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9
        )
    fig.suptitle("Examples by difficulty (label, score)")
    return _png(fig)


def plot_training(metrics: pd.DataFrame) -> bytes | None:
    """Loss (and held-out loss) and mask ratio against step."""
    if metrics is None or "loss" not in metrics or "step" not in metrics:
        return None
    fig, (ax_loss, ax_ratio) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax_loss.plot(metrics["step"], metrics["loss"], label="train loss")
    if "val_loss" in metrics and metrics["val_loss"].notna().any():
        val = metrics[metrics["val_loss"].notna()]
        ax_loss.plot(val["step"], val["val_loss"], "o-", label="held-out loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("masked reconstruction loss")
    ax_loss.legend()
    ax_loss.set_title("MAE pretraining loss")
    if "mask_ratio" in metrics:
        ax_ratio.plot(metrics["step"], metrics["mask_ratio"], color="#e6550d")
    ax_ratio.set_ylim(0, 1)
    ax_ratio.set_xlabel("step")
    ax_ratio.set_ylabel("mask ratio")
    ax_ratio.set_title("Mask-ratio schedule")
    return _png(fig)


EVAL_PROTOCOLS = (("kNN", "knn"), ("linear probe", "probe"), ("fine-tune", "finetune"))
# what each protocol is measured on: the trained encoder and the two baselines it has to beat
EVAL_SUBJECTS = (
    ("pretrained", "", "#2b8cbe"),
    ("random init", "random_", "#bdbdbd"),
    ("raw pixels", "pixel_", "#e6550d"),
)


def plot_evaluation(evaluation: dict[str, Any]) -> bytes | None:
    """Accuracy per protocol (kNN, linear probe, fine-tune) of the pretrained encoder beside its random init
    and the raw pixels (no fine-tune for pixels): an encoder below the orange bar learned less than the
    pixels already hold."""
    protocols = [(name, key) for name, key in EVAL_PROTOCOLS if evaluation.get(f"{key}_accuracy") is not None]
    if not protocols:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / len(EVAL_SUBJECTS)
    for j, (label, prefix, color) in enumerate(EVAL_SUBJECTS):
        offset = (j - (len(EVAL_SUBJECTS) - 1) / 2) * width
        for i, (_, key) in enumerate(protocols):
            value = evaluation.get(f"{prefix}{key}_accuracy")
            if value is None:
                continue
            ax.bar(i + offset, value, width, color=color, label=label)
            ax.text(i + offset, value + 0.01, f"{value:.2f}", ha="center", fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one legend entry per subject, not per bar
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xticks(np.arange(len(protocols)), [name for name, _ in protocols])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("Evaluation: pretrained vs random init vs raw pixels")
    return _png(fig)


def evaluation_lines(e: dict[str, Any]) -> list[str]:
    """One Markdown line per protocol: pretrained, then its random init and the raw pixels."""
    lines = []
    for name, key in EVAL_PROTOCOLS:
        if e.get(f"{key}_accuracy") is None:
            continue
        baselines = [
            f"{label} {e[f'{prefix}{key}_accuracy']:.3f}"
            for label, prefix, _ in EVAL_SUBJECTS[1:]
            if e.get(f"{prefix}{key}_accuracy") is not None
        ]
        suffix = f" ({', '.join(baselines)})" if baselines else ""
        lines.append(f"- {name} accuracy: {e[f'{key}_accuracy']:.3f}{suffix}")
    if e.get("pixel_knn_accuracy") is not None and "knn_accuracy" in e:
        beaten = [
            name
            for name, key in EVAL_PROTOCOLS[:2]
            if e.get(f"{key}_accuracy", 0) > e.get(f"pixel_{key}_accuracy", 1)
        ]
        lines.append(
            "- against raw pixels: the encoder beats them on " + " and ".join(beaten)
            if beaten
            else "- against raw pixels: the encoder's features do not beat the pixels on kNN or the linear probe"
        )
    if "labels" in e or "test" in e:
        lines.append(
            f"- evaluation labels: {e.get('labels', 'folder names')}; test split: {e.get('test', 'holdout')}"
        )
    return lines


def summary_lines(art: RunArtifacts) -> list[str]:
    """The numbers a reader wants first, as Markdown bullet lines."""
    lines = []
    s = art.summary
    if art.manifest is not None:
        m = art.manifest
        kept = int(m["kept"].sum())
        lines.append(f"- images in the manifest: {len(m)}; kept {kept}, pruned {len(m) - kept}")
        reasons = m["reason"].value_counts().to_dict()
        lines.append("- outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
    if art.quarantine is not None:
        q = art.quarantine["reason"].value_counts().to_dict()
        lines.append(
            f"- quarantined: {len(art.quarantine)}"
            + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(q.items())) + ")" if q else "")
        )
    if "noisy_total" in s:
        lines.append(f"- injected noisy labels among the pruned: {s['noisy_pruned']} of {s['noisy_total']}")
    if art.metrics is not None and "loss" in art.metrics:
        loss = art.metrics["loss"]
        lines.append(
            f"- pretraining loss: {loss.iloc[0]:.4f} → {loss.iloc[-1]:.4f} over {int(art.metrics['step'].iloc[-1])} steps"
        )
    lines += evaluation_lines(art.evaluation)
    if "seconds" in s:
        lines.append(f"- wall time: {s['seconds']:.0f} s")
    return lines


PLOTS = (
    (
        "scores.png",
        "Difficulty scores per class",
        lambda art, so: plot_score_histograms(art.manifest) if art.manifest is not None else None,
    ),
    (
        "examples.png",
        "Kept and pruned examples",
        lambda art, so: plot_example_grids(art.manifest, so) if art.manifest is not None else None,
    ),
    ("training.png", "Pretraining", lambda art, so: plot_training(art.metrics)),
    ("evaluation.png", "Evaluation", lambda art, so: plot_evaluation(art.evaluation)),
)


def write_report(run_dir: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write `<run_dir>/report/` (PNGs, index.html, summary.md); returns the report folder's URL."""
    art = load_artifacts(run_dir, storage_options)
    out = join(run_dir, "report")
    written: list[tuple[str, str]] = []
    skipped: list[str] = []
    for name, title, make in PLOTS:
        png = make(art, storage_options)
        if png is None:
            skipped.append(title)
            continue
        atomic_write_bytes(join(out, name), png, storage_options)
        written.append((name, title))
    lines = summary_lines(art)
    md = [f"# maskdiet run report\n\nRun directory: `{run_dir}`\n", *lines, ""]
    md += [f"## {title}\n\n![{title}]({name})\n" for name, title in written]
    if skipped:
        md.append("Not plotted (no data in this run): " + ", ".join(skipped) + "\n")
    atomic_write_bytes(join(out, "summary.md"), "\n".join(md).encode(), storage_options)
    body = "".join(f"<li>{html.escape(line[2:])}</li>" for line in lines)
    figures = "".join(
        f'<h2>{html.escape(title)}</h2><img src="{name}" alt="{html.escape(title)}" style="max-width:100%">'
        for name, title in written
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>maskdiet report</title></head>"
        "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
        f"<h1>maskdiet run report</h1><p>Run directory: <code>{html.escape(run_dir)}</code></p><ul>{body}</ul>{figures}"
        "</body></html>"
    )
    atomic_write_bytes(join(out, "index.html"), page.encode(), storage_options)
    log.info("report written to %s", out)
    return out
