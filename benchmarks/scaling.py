"""Scaling: curate throughput on 1 vs 2 Ray worker CPUs, and a two-node cluster showing the stages spread.

Workload: `N` JPEG photo crops of 224² pixels (written by `pipeline.demo_data`) curated with
`--score none` to 64² pixels: list → read → decode → manifest + quarantine, i.e. `pipeline.curate.curate`
exactly as `maskdiet curate` runs it. Both CPU counts run on one local Ray with 2 CPUs, Ray Data capped at 1 CPU
then at 2 (its resource limit: 1 or 2 read/decode tasks at once); each gets one untimed warm-up run and
timed repeats, and the median is reported.
The ratio 2-CPU / 1-CPU is 2.0 for perfect scaling; the serial parts (listing, writing the manifest, Ray
Data's scheduling on the driver) keep it below that.

Two simulated nodes: `ray.cluster_utils.Cluster` starts a head and a second node (a raylet each, 1 CPU
each) on this machine; the read + decode stages run with a tag stage fused behind them that records the node
and worker process of each task, so the rows count real tasks and images per node.

On the same cluster, scoring's two parallel parts (issue 24): `stages.score.train_proxies` trains K = 2
`cnn-small` proxies for one epoch over `N` 32 px images put in the object store as chunks
(`PixelChunks.from_array`, from the driver on the head node), then `stages.score.score_rows` scores every
row with them (Ray Data tasks, `score.compute=tasks`). Both run unchanged, with their own resources; neither
reports where its tasks ran, so for this run only (a patch of the module's names in this process, not of its
source) `train_proxies` remotes `proxy_on_node` (which calls `train_proxy` and adds the node id to its
result) and `score_rows` maps `ScoreModelsOnNode` (`ScoreModels` plus two output columns: the node id and an
id per call, i.e. per task, since a block is one call). The rows count proxy tasks, scoring tasks and
scored images per node. Target: every node ran at least one of each.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/scaling.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
from ray.data import ExecutionResources

import stages.score
from benchmarks.common import Row, local_ray, main, ratio, repeat, tiny, with_start_retries
from benchmarks.ingest import OUTPUT_PX, write_images
from pipeline.core.config import Config, ScoreConfig, load_config
from pipeline.curate import curate
from pipeline.models.proxy import ProxyResult, ProxySpec, RowWindows, train_proxy
from stages.base import Batch
from stages.pixels import PixelChunks
from stages.score import ScoreModels

log = logging.getLogger(__name__)

# Read by run_all.py: the two-node cluster ran read + decode, proxy training and scoring on both nodes.
TARGETS = {
    "scaling_cluster_head_node_tasks": (">=", 1.0),
    "scaling_cluster_worker_node_tasks": (">=", 1.0),
    "scaling_proxy_head_node_tasks": (">=", 1.0),
    "scaling_proxy_worker_node_tasks": (">=", 1.0),
    "scaling_score_head_node_tasks": (">=", 1.0),
    "scaling_score_worker_node_tasks": (">=", 1.0),
}

PROXIES = 2  # K: one proxy-training task per node when both run at once on 1 CPU each
SCORE_PX = 32
SCORE_CLASSES = 10


def workload(quick: bool) -> tuple[int, int]:
    """(number of images, timed repeats per CPU count)."""
    if tiny():
        return 40, 1
    return (1500, 2) if quick else (3000, 3)


def curate_config(input_url: str, output_url: str) -> Config:
    return load_config(
        overrides=[
            f"data.input={input_url}",
            f"output={output_url}",
            f"decode.image_size={OUTPUT_PX}",
            f"data.read_batch_size={8 if tiny() else 64}",  # tiny inputs still make several tasks
            "score.method=none",
        ]
    )


def curate_rate(config: Config, cpus: int, repeats: int) -> float:
    """Images/s of `curate(config)` with Ray Data capped at `cpus` CPUs (median of `repeats`).

    The cap is Ray Data's own resource limit (`DataContext.execution_options.resource_limits`), so both
    runs share one Ray and differ only in how many read/decode tasks run at once.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = ExecutionResources(cpu=cpus)
    try:
        result = curate(config)  # warm-up
        images = len(result.manifest) + len(result.quarantine)
        timing = repeat(lambda: curate(config), repeats)
    finally:
        ctx.execution_options.resource_limits = saved
    log.info("curate on %d CPU(s): %s s for %d images", cpus, timing.seconds, images)
    return images / timing.median


class TagNode:
    """`map_batches` callable fused after decode: which node and worker process ran this batch's task."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import ray

        n = len(batch["path"])
        batch["node"] = np.asarray([ray.get_runtime_context().get_node_id()] * n, dtype=object)
        batch["pid"] = np.full(n, os.getpid(), dtype=np.int64)
        return batch


@dataclass
class ProxyResultOnNode(ProxyResult):
    """A proxy's training result and the node whose task trained it."""

    node: str = ""


def proxy_on_node(images: RowWindows, labels: np.ndarray, spec: ProxySpec, seed: int) -> ProxyResultOnNode:
    """`train_proxy`, run where `train_proxies` schedules it, plus that node's id."""
    import ray

    result = train_proxy(images, labels, spec, seed)
    return ProxyResultOnNode(**vars(result), node=ray.get_runtime_context().get_node_id())


class ScoreModelsOnNode(ScoreModels):
    """`ScoreModels` plus, per row, the node that scored it (`node`) and an id of the call (`call`): with
    `score_rows`' one call per block, one per task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outputs = (*self.outputs, "node", "call")

    def process(self, batch: Batch) -> Batch:
        import ray

        out = super().process(batch)
        n = len(out["row"])
        out["node"] = np.asarray([ray.get_runtime_context().get_node_id()] * n, dtype=object)
        out["call"] = np.full(n, random.getrandbits(62), dtype=np.int64)
        return out


@dataclass
class ScoringSpread:
    """Per node id: proxy-training tasks, scoring tasks and rows scored."""

    proxy_tasks: Counter[str]
    score_tasks: Counter[str]
    score_images: Counter[str]


def scoring_spread(count: int) -> ScoringSpread:
    """Train K proxies and score `count` random 32 px images with them on the connected cluster, with
    `stages.score`'s own `train_proxies` and `score_rows`, recording where each task ran."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, SCORE_PX, SCORE_PX, 3), dtype=np.uint8)
    labels = rng.integers(0, SCORE_CLASSES, size=count).astype(np.int64)
    # tiny inputs still make several scoring tasks; full size keeps the defaults (512-row blocks)
    config = ScoreConfig(
        num_models=PROXIES, epochs=1, cpus_per_model=1.0, **({"score_batch_size": 8} if tiny() else {})
    )
    spec = ProxySpec.from_config(config, SCORE_CLASSES, image_size=SCORE_PX)
    pixels = PixelChunks.from_array(images, config.chunk_rows)
    with (
        mock.patch.object(stages.score, "train_proxy", proxy_on_node),
        mock.patch.object(stages.score, "ScoreModels", ScoreModelsOnNode),
    ):
        results = stages.score.train_proxies(pixels, labels, spec, list(range(PROXIES)), config)
        columns = stages.score.score_rows(
            np.arange(count), pixels, labels, [r.state for r in results], spec, config
        )
    assert np.isfinite(columns["el2n"]).all(), "scoring on the cluster gave non-finite EL2N"
    # by attribute: under `python -m` this module is __main__, and its classes travel by value
    proxy_tasks = Counter(str(getattr(r, "node", "")) for r in results)
    proxy_tasks.pop("", None)
    assert sum(proxy_tasks.values()) == PROXIES, "train_proxies did not run the patched task"
    calls = {(str(n), int(c)) for n, c in zip(columns["node"], columns["call"], strict=True)}
    return ScoringSpread(
        proxy_tasks=proxy_tasks,
        score_tasks=Counter(n for n, _ in calls),
        score_images=Counter(str(n) for n in columns["node"]),
    )


def cluster_spread(config: Config, count: int) -> list[Row]:
    """Run read + decode, then proxy training and scoring over `count` images, on a two-node `Cluster`
    (1 CPU each); rows: tasks and images per node."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.core.runtime import configure_data_context
    from stages.decode import DecodeOptions, DecodeStage
    from stages.read import list_images, read_images

    node_args = {"num_cpus": 1, "object_store_memory": 300_000_000}

    def start_head() -> Cluster:
        return Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})

    cluster = with_start_retries(start_head)
    try:
        with_start_retries(lambda: cluster.add_node(**node_args))
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        cluster.wait_for_nodes()
        configure_data_context()
        head = ray.get_runtime_context().get_node_id()  # the driver is attached to the head node
        listing = list_images(config.data)
        step = config.data.read_batch_size
        ds = (
            read_images(listing, config.data)
            .map_batches(DecodeStage(DecodeOptions.from_config(config.decode)), batch_size=step)
            .map_batches(TagNode(), batch_size=step)
            .select_columns(["node", "pid", "ok"])
        )
        images: Counter[str] = Counter()
        tasks: Counter[str] = Counter()  # one output block per task: read + decode + tag are fused
        workers: dict[str, set[int]] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            node = str(batch["node"][0])
            tasks[node] += 1
            images[node] += len(batch["node"])
            workers.setdefault(node, set()).update(int(p) for p in batch["pid"])
        spread = scoring_spread(count)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
        cluster.shutdown()
    other = [n for n in nodes if n != head]
    assert len(other) == 1, f"expected a head and one more node, got {len(nodes)} nodes"
    rows: list[Row] = []
    for label, node in (("head", head), ("worker", other[0])):
        rows.append((f"scaling_cluster_{label}_node_tasks", float(tasks[node])))
        rows.append((f"scaling_cluster_{label}_node_images", float(images[node])))
        rows.append((f"scaling_cluster_{label}_node_worker_processes", float(len(workers.get(node, ())))))
    rows.append(("scaling_cluster_nodes_used", float(sum(1 for n in nodes if images[n] > 0))))
    for label, node in (("head", head), ("worker", other[0])):
        rows.append((f"scaling_proxy_{label}_node_tasks", float(spread.proxy_tasks[node])))
    for label, node in (("head", head), ("worker", other[0])):
        rows.append((f"scaling_score_{label}_node_tasks", float(spread.score_tasks[node])))
        rows.append((f"scaling_score_{label}_node_images", float(spread.score_images[node])))
    return rows


def run(quick: bool = False) -> list[Row]:
    count, repeats = workload(quick)
    with tempfile.TemporaryDirectory(prefix="maskdiet-bench-scaling-") as tmp:
        images = os.path.join(tmp, "images")
        write_images(images, count)
        config = curate_config(images, os.path.join(tmp, "out"))
        with local_ray(num_cpus=2):
            one = curate_rate(config, 1, repeats)
            two = curate_rate(config, 2, repeats)
        rows: list[Row] = [
            ("scaling_curate_1cpu_images_per_s", one),
            ("scaling_curate_2cpu_images_per_s", two),
            ("scaling_curate_ratio_2cpu_vs_1cpu", ratio(two, one)),
        ]
        rows += cluster_spread(config, count)
    rows.append(("scaling_images", float(count)))
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
