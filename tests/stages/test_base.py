"""The stage contract: chains are checked when built (a missing column fails before any work), and the Ray
Data adapter runs a stage as tasks or as an actor pool that sets it up once per actor."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray.data

from pipeline.core.config import load_config
from pipeline.curate import CurationPlan, curation_stages
from stages.base import (
    ALL_TO_ALL,
    Batch,
    ChainStages,
    Resources,
    Stage,
    StageChainError,
    check_chain,
    map_batches,
    run_on_driver,
)
from stages.decode import DecodeOptions, DecodeStage
from stages.read import LISTING_COLUMNS, ReadBytes


class AddOffset(Stage):
    """Adds `offset` to `x`; its `setup` stands for loading a model, and stamps which copy ran it."""

    name = "add-offset"
    inputs = ("x",)
    outputs = ("y", "copy")

    def __init__(self, offset: int, resources: Resources = Resources()) -> None:
        self.offset = offset
        self.resources = resources
        self.copy = ""

    def setup(self) -> None:
        self.copy = f"{os.getpid()}-{id(self)}"

    def process(self, batch: Batch) -> Batch:
        n = len(batch["x"])
        return {**batch, "y": batch["x"] + self.offset, "copy": np.asarray([self.copy] * n, dtype=object)}


class Total(Stage):
    """All-to-all: every row's share of the total (needs every row)."""

    name = "total"
    kind = ALL_TO_ALL
    inputs = ("y",)
    outputs = ("share",)

    def process(self, batch: Batch) -> Batch:
        return {**batch, "share": batch["y"] / batch["y"].sum()}


def test_check_chain_follows_the_columns() -> None:
    """Each stage's outputs join what is available; `drops` and `passthrough=False` take columns away."""
    read, decode = ReadBytes({}), DecodeStage(DecodeOptions())
    after = check_chain([read, decode], LISTING_COLUMNS)
    assert after == {"path", "label", "class_name", "sha256", "image", "ok", "reason", "error"}  # no bytes
    assert check_chain([ChainStages(read, decode)], LISTING_COLUMNS) == after


def test_a_stage_missing_a_column_fails_before_the_run() -> None:
    """Decode before read: `bytes` is made by no earlier stage. The error names the stage and the column,
    also inside a chain of stages run as one."""
    with pytest.raises(StageChainError, match=r"stage 'decode' needs column\(s\) \['bytes'\]"):
        check_chain([DecodeStage(DecodeOptions()), ReadBytes({})], LISTING_COLUMNS)
    with pytest.raises(StageChainError, match=r"stage 'total' needs column\(s\) \['y'\]"):
        check_chain([ChainStages(ReadBytes({})), Total()], LISTING_COLUMNS)


def test_curation_composes_a_chain_that_fits(tmp_path) -> None:
    """The chain `curate` runs, scored or not, passes the check; taken apart, it fails where it breaks."""
    for method in ("el2n", "prototype", "none"):
        config = load_config(None, [f"score.method={method}", f"output={tmp_path}"])
        plan = curation_stages(config, ["a", "b"], str(tmp_path / "manifest.parquet"), {})
        names = [s.name for s in plan.stages()]
        assert names[:2] == ["read → decode", "gather-decoded"] and names[-2:] == ["prune", "manifest"]
    config = load_config(None, [f"output={tmp_path}"])
    plan = curation_stages(config, ["a", "b"], str(tmp_path / "manifest.parquet"), {})
    unpruned = CurationPlan(plan.ingest, plan.rows[:-1], plan.manifest)  # prune left out
    with pytest.raises(StageChainError, match=r"'manifest' needs column\(s\) \['kept', 'reason'\]"):
        check_chain(unpruned.stages(), LISTING_COLUMNS)
    # a source that gives only paths: no label for gather to carry on to score; found before any read
    with pytest.raises(
        StageChainError, match=r"'gather-decoded' needs column\(s\) \['class_name', 'label'\]"
    ):
        check_chain(plan.stages(), ("path",))


def test_an_all_to_all_stage_runs_on_the_driver_only(ray_cluster: None) -> None:
    batch = run_on_driver([AddOffset(1), Total()], {"x": np.asarray([1, 2, 4])})
    np.testing.assert_allclose(batch["share"], [0.2, 0.3, 0.5])
    with pytest.raises(StageChainError, match="all-to-all"):
        map_batches(ray.data.range(3), Total(), batch_size=None)


@pytest.mark.parametrize("actors", [None, 1])
def test_map_batches_runs_a_stage_as_tasks_or_actors(ray_cluster: None, actors: int | None) -> None:
    """The same rows either way. An actor pool of one sets the stage up once for every batch; tasks set up
    each copy of the stage they run (at least once per task)."""
    stage = AddOffset(10, Resources(cpus=0.5, actors=actors))
    dataset = ray.data.from_numpy(np.arange(40)).rename_columns({"data": "x"}).repartition(4)
    rows = map_batches(dataset, stage, batch_size=5).take_all()
    assert sorted(int(r["y"]) for r in rows) == list(range(10, 50))
    copies = {r["copy"] for r in rows}
    assert all(copies)  # every batch ran after a setup
    if actors == 1:
        assert len(copies) == 1
