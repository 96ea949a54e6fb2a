"""Report: every plot renders from a run directory's files, and the pages reference what exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.report import load_artifacts, summary_lines, write_report
from stages.manifest import write_manifest, write_quarantine


def make_run_dir(demo_folder: Path, run_dir: Path) -> pd.DataFrame:
    truth = pd.read_parquet(demo_folder / "_truth.parquet")
    rng = np.random.default_rng(0)
    manifest = pd.DataFrame(
        {
            "path": truth["path"],
            "sha256": "0" * 64,
            "label": truth["given_label"],
            "class_name": [p.split("/")[-2] for p in truth["path"]],
            "score": rng.uniform(0, 1.4, len(truth)),
        }
    )
    manifest["kept"] = manifest["score"].between(0.3, 1.2)
    manifest["reason"] = np.where(manifest["kept"], "kept", "pruned:easy")
    write_manifest(str(run_dir / "manifest.parquet"), manifest, {"run_id": "r1"})
    write_quarantine(
        str(run_dir / "quarantine.parquet"),
        pd.DataFrame({"path": ["x.jpg"], "sha256": [""], "reason": ["empty"], "error": ["zero-byte object"]}),
        {"run_id": "r1"},
    )
    steps = np.arange(1, 101)
    lines = [json.dumps({"step": int(s), "loss": float(1 / s), "mask_ratio": 0.75}) for s in steps]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))
    (run_dir / "evaluation.json").write_text(
        json.dumps(
            {
                "knn_accuracy": 0.8,
                "random_knn_accuracy": 0.3,
                "probe_accuracy": 0.7,
                "random_probe_accuracy": 0.2,
                "pixel_knn_accuracy": 0.75,
                "pixel_probe_accuracy": 0.6,
                "finetune_accuracy": 0.9,
                "random_finetune_accuracy": 0.4,
            }
        )
    )
    return manifest


def test_report_writes_every_plot(demo_folder: Path, tmp_path: Path) -> None:
    manifest = make_run_dir(demo_folder, tmp_path)
    url = write_report(str(tmp_path))
    report = Path(url)
    for name in ("scores.png", "examples.png", "training.png", "evaluation.png"):
        with Image.open(report / name) as image:
            assert image.format == "PNG" and image.size[0] > 200
    page = (report / "index.html").read_text()
    assert page.count("<img") == 4 and "kNN accuracy: 0.800" in page
    summary = (report / "summary.md").read_text()
    kept = int(manifest["kept"].sum())
    assert f"kept {kept}, pruned {len(manifest) - kept}" in summary
    assert "quarantined: 1 (empty 1)" in summary
    assert "kNN accuracy: 0.800 (random init 0.300, raw pixels 0.750)" in summary
    assert "fine-tune accuracy: 0.900 (random init 0.400)" in summary
    assert "raw pixels 0.750" in page


def test_evaluation_lines_say_when_the_pixels_win() -> None:
    """The raw-pixel baseline is stated, and an encoder that loses to it is called out, not hidden."""
    from pipeline.report import evaluation_lines, plot_evaluation

    losing = {
        "knn_accuracy": 0.21,
        "probe_accuracy": 0.5,
        "random_knn_accuracy": 0.15,
        "random_probe_accuracy": 0.37,
        "pixel_knn_accuracy": 0.77,
        "pixel_probe_accuracy": 0.55,
        "finetune_accuracy": None,  # evaluate.finetune_epochs=0
        "random_finetune_accuracy": None,
    }
    lines = evaluation_lines(losing)
    assert lines[0] == "- kNN accuracy: 0.210 (random init 0.150, raw pixels 0.770)"
    assert not any(line.startswith("- fine-tune") for line in lines)
    assert any("do not beat the pixels" in line for line in lines)
    assert "beats them on kNN" in evaluation_lines({**losing, "knn_accuracy": 0.8})[-1]
    assert plot_evaluation(losing) is not None
    # an evaluation.json from before the pixel baseline still renders
    old = {k: v for k, v in losing.items() if not k.startswith(("pixel_", "finetune", "random_finetune"))}
    assert evaluation_lines(old) == [
        "- kNN accuracy: 0.210 (random init 0.150)",
        "- linear probe accuracy: 0.500 (random init 0.370)",
    ]
    assert plot_evaluation(old) is not None and plot_evaluation({}) is None


def test_missing_parts_are_skipped_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    url = write_report(str(tmp_path))
    assert (Path(url) / "training.png").exists() and not (Path(url) / "scores.png").exists()
    assert "Not plotted" in (Path(url) / "summary.md").read_text()
    assert summary_lines(load_artifacts(str(tmp_path)))[0].startswith("- pretraining loss: 2.0000")
