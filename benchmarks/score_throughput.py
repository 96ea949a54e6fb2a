"""Scoring throughput: maskdiet's Ray Data scoring vs a bare torch inference loop, same models and images.

Workload: `N` decoded images (S×S×3 uint8, S = 32, fixed-seed pixels; throughput does not depend on what
they show) scored by K = 5 `cnn-small` proxies: per image, K forward passes in eval mode, softmax, EL2N and
last-layer GraNd, mean and std over K — what `maskdiet curate --score el2n` runs after proxy training.

- maskdiet: `stages.score.score_rows` — the pixels are in the object store as chunks (`stages.pixels`, as
  curate leaves them, put there once before the timing, as the loop's are in memory); Ray Data `map_batches`
  tasks (the default, `score.compute=tasks`: 1 CPU and 1 torch thread each, on Ray's running workers)
  build the K models per block of up to 8 batches of `score.score_batch_size` rows and score them; timed
  from building the dataset to the last block on the driver. Also measured: `score.compute=actors`
  (`ActorPoolStrategy(size=cores)`, the models loaded once per actor, the actors started every pass).
- baseline: one process, `torch.set_num_threads(cores)`, a plain loop over the same batches calling the
  same models and the same EL2N / GraNd functions.

Passes alternate between the loop and the tasks, after one untimed warm-up of each (workers that have
imported torch, as proxy training leaves them in a curate run); the actor pool runs last, since its actors
take over Ray's idle workers and exit with the pool, so tasks after it start on fresh processes again.
Medians are reported.
`score_first_pass_s` is the tasks' first pass on fresh workers (torch imported there). Target: maskdiet
≥ 0.9× the bare loop.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Row, local_ray, main, ratio, tiny
from pipeline.core.config import ScoreConfig
from pipeline.models.proxy import ProxySpec, build_proxy, to_input
from stages.pixels import PixelChunks
from stages.score import el2n, grand_last_layer, score_rows

log = logging.getLogger(__name__)

# The target (read by run_all.py): Ray Data scoring at ≥ 0.9× a bare torch loop.
TARGETS = {"score_throughput_ratio_vs_torch_loop": (">=", 0.9)}

K = 5
SIZE = 32
CLASSES = 10


def _inputs(n: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, torch.Tensor]]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=n).astype(np.int64)
    states = []
    for k in range(K):
        torch.manual_seed(k)
        states.append(build_proxy("cnn-small", CLASSES).state_dict())
    return images, labels, states


def torch_loop(
    images: np.ndarray, labels: np.ndarray, states: list[dict[str, torch.Tensor]], batch: int, threads: int
) -> np.ndarray:
    """The baseline: score every image in one process with a plain loop; returns mean EL2N (N,)."""
    torch.set_num_threads(threads)
    models = []
    for state in states:
        model = build_proxy("cnn-small", CLASSES)
        model.load_state_dict(state)
        models.append(model.eval())
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = to_input(images[start : start + batch])
            y = labels[start : start + batch]
            per_el2n, per_grand = [], []
            for model in models:
                h = model.features(x)
                probs = F.softmax(model.head(h), dim=1).numpy()
                per_el2n.append(el2n(probs, y))
                per_grand.append(grand_last_layer(probs, y, h.numpy()))
            stacked = np.stack(per_el2n)
            out.append(stacked.mean(0))
            _ = stacked.std(0), np.stack(per_grand).mean(0)
    return np.concatenate(out)


def run(quick: bool = False) -> list[Row]:
    cores = os.cpu_count() or 1
    n, repeats = (256, 1) if tiny() else ((20_000, 3) if quick else (50_000, 5))
    images, labels, states = _inputs(n)
    spec = ProxySpec.from_config(ScoreConfig(), CLASSES)
    configs = {compute: ScoreConfig(actors=cores, compute=compute) for compute in ("tasks", "actors")}
    batch = configs["tasks"].score_batch_size
    rows = np.arange(n)
    threads = torch.get_num_threads()
    seconds: dict[str, list[float]] = {"loop": [], "tasks": [], "actors": []}
    result: dict[str, np.ndarray] = {}

    def timed(name: str) -> None:
        start = time.perf_counter()
        if name == "loop":
            torch_loop(images, labels, states, batch, cores)
            torch.set_num_threads(threads)
        else:
            result.update(score_rows(rows, pixels, labels, states, spec, configs[name]))
        seconds[name].append(time.perf_counter() - start)

    with local_ray(cores):
        # in the object store as curate leaves them (chunks), as the loop has them in memory
        pixels = PixelChunks.from_array(images, ScoreConfig().chunk_rows)
        timed("tasks")  # fresh workers: torch is imported in each
        first_pass = seconds["tasks"].pop()
        timed("loop")
        seconds["loop"].pop()
        for _ in range(repeats):
            timed("loop")
            timed("tasks")
        for _ in range(repeats):  # last: the pool's actors take over Ray's idle workers, and die with it
            timed("actors")
    log.info("seconds per pass: %s", seconds)
    reference = torch_loop(images[:512], labels[:512], states, batch, cores)
    torch.set_num_threads(threads)
    np.testing.assert_allclose(result["el2n"][:512], reference, rtol=1e-4, atol=1e-5)  # same numbers
    rate = {name: n / float(np.median(s)) for name, s in seconds.items()}
    return [
        ("score_images", float(n)),
        ("score_images_per_s_ray_data", rate["tasks"]),
        ("score_images_per_s_torch_loop", rate["loop"]),
        ("score_throughput_ratio_vs_torch_loop", ratio(rate["tasks"], rate["loop"])),
        ("score_first_pass_s", first_pass),
        ("score_images_per_s_ray_data_actors", rate["actors"]),
        ("score_actors_ratio_vs_torch_loop", ratio(rate["actors"], rate["loop"])),
    ]


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
