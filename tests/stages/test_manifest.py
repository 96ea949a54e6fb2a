"""Manifest: the sink stage writes what `read_table` reads back, in schema order, with its metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.base import StageChainError, check_chain
from stages.manifest import MANIFEST_INPUTS, MANIFEST_SCHEMA, ManifestStage, manifest_frame, read_table


def rows() -> dict[str, np.ndarray]:
    return {
        "reason": np.asarray(["kept", "pruned:easy"], dtype=object),  # out of schema order on purpose
        "path": np.asarray(["b.png", "a.png"], dtype=object),
        "sha256": np.asarray(["2", "1"], dtype=object),
        "label": np.asarray([1, 0]),
        "class_name": np.asarray(["b", "a"], dtype=object),
        "image": np.zeros((2, 4, 4, 3), dtype=np.uint8),
        "score": np.asarray([0.5, np.nan]),
        "kept": np.asarray([True, False]),
    }


def test_manifest_stage_writes_the_rows_and_passes_them_on(tmp_path: Path) -> None:
    url = str(tmp_path / "manifest.parquet")
    batch = rows()
    out = ManifestStage(url, {"run_id": "r1", "classes": ["a", "b"]})(batch)
    assert out is batch
    frame, metadata = read_table(url)
    assert list(frame.columns) == MANIFEST_SCHEMA.names  # score columns not computed are null
    assert frame["path"].tolist() == ["a.png", "b.png"]  # sorted by path
    assert frame["el2n"].isna().all() and frame["kept"].tolist() == [False, True]
    assert metadata["run_id"] == "r1" and metadata["classes"] == ["a", "b"]


def test_manifest_frame_keeps_the_schema_columns_in_order() -> None:
    frame = manifest_frame(rows())
    assert list(frame.columns) == ["path", "sha256", "label", "class_name", "score", "kept", "reason"]


def test_a_chain_without_kept_and_reason_fails_at_the_manifest() -> None:
    """Nothing pruned: the manifest's `kept` and `reason` are missing, found when the chain is built."""
    assert set(MANIFEST_INPUTS) <= set(MANIFEST_SCHEMA.names)
    with pytest.raises(StageChainError, match=r"'manifest' needs column\(s\) \['kept', 'reason'\]"):
        check_chain([ManifestStage("unused", {})], ("path", "sha256", "label", "class_name", "score"))
