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
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/scaling.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging
import os
import tempfile
from collections import Counter
from typing import Any

import numpy as np
from ray.data import ExecutionResources

from benchmarks.common import Row, local_ray, main, ratio, repeat, tiny, with_start_retries
from benchmarks.ingest import OUTPUT_PX, write_images
from pipeline.core.config import Config, load_config
from pipeline.curate import curate

log = logging.getLogger(__name__)


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


def cluster_spread(config: Config) -> list[Row]:
    """Run read + decode on a two-node `Cluster` (1 CPU each); rows: tasks and images per node."""
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
        rows += cluster_spread(config)
    rows.append(("scaling_images", float(count)))
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
