"""Scoring throughput: maskdiet's Ray Data actor pool vs a bare torch inference loop, same models and images.

Workload: `N` decoded images (S×S×3 uint8, S = 32, fixed-seed pixels; throughput does not depend on what
they show) scored by K = 5 `cnn-small` proxies: per image, K forward passes in eval mode, softmax, EL2N and
last-layer GraNd, mean and std over K — what `maskdiet curate --score el2n` runs after proxy training.

- maskdiet: `stages.score.score_rows` — the pixels go to the object store once, a Ray Data `map_batches`
  actor pool (`ActorPoolStrategy(size=cores)`, 1 torch thread and 1 CPU per actor) loads the K models once
  per actor and scores batches of `score.score_batch_size` rows; timed from building the dataset to the
  last batch on the driver, actor start-up included (every curate run pays it).
- baseline: one process, `torch.set_num_threads(cores)`, a plain loop over the same batches calling the
  same models and the same EL2N / GraNd functions.

Target: maskdiet ≥ 0.9× the bare loop. Each pass is repeated and the median reported. `_steady` rows leave
out the actor pool's start-up: rows after the first delivered batch over the time after it.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Row, local_ray, main, ratio, repeat, tiny
from pipeline.config import ScoreConfig
from stages.score import ProxySpec, build_proxy, el2n, grand_last_layer, score_rows, to_input

log = logging.getLogger(__name__)

# The target (read by run_all.py): the actor pool at ≥ 0.9× a bare torch loop, start-up included.
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
    n, repeats = (256, 1) if tiny() else ((4096, 3) if quick else (20_000, 3))
    images, labels, states = _inputs(n)
    config = ScoreConfig(actors=cores)
    spec = ProxySpec.from_config(config, CLASSES)
    rows = np.arange(n)
    threads = torch.get_num_threads()
    baseline = repeat(lambda: torch_loop(images, labels, states, config.score_batch_size, cores), repeats)
    torch.set_num_threads(threads)
    steady: list[float] = []
    with local_ray(cores):
        result: dict[str, np.ndarray] = {}

        def ray_pass() -> None:
            marks: list[tuple[float, int]] = []
            result.update(
                score_rows(
                    rows,
                    images,
                    labels,
                    states,
                    spec,
                    config,
                    progress=lambda _phase, done, _total: marks.append((time.perf_counter(), done)),
                )
            )
            if len(marks) > 1:  # rows after the first batch over the time after it: actors already up
                steady.append((marks[-1][1] - marks[0][1]) / max(marks[-1][0] - marks[0][0], 1e-9))

        start = time.perf_counter()
        ours = repeat(ray_pass, repeats)
        log.info("ray passes took %.1f s", time.perf_counter() - start)
    reference = torch_loop(images[:512], labels[:512], states, config.score_batch_size, cores)
    torch.set_num_threads(threads)
    np.testing.assert_allclose(result["el2n"][:512], reference, rtol=1e-4, atol=1e-5)  # same numbers
    ray_rate, loop_rate = n / ours.median, n / baseline.median
    rows = [
        ("score_images", float(n)),
        ("score_images_per_s_ray_data", ray_rate),
        ("score_images_per_s_torch_loop", loop_rate),
        ("score_throughput_ratio_vs_torch_loop", ratio(ray_rate, loop_rate)),
    ]
    if steady:  # a pass too small to span two batches after the first has no steady rate: no row
        steady_rate = float(np.median(steady))
        rows += [
            ("score_images_per_s_ray_data_steady", steady_rate),
            ("score_steady_ratio_vs_torch_loop", ratio(steady_rate, loop_rate)),
        ]
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
