"""MAE training-step time at mask ratio 0.75 vs 0.0 for the same model (the MAE paper: ≥3× faster at 75 %).

The encoder sees only the visible quarter of the patches at 0.75; the light decoder sees all of them at
both ratios, so the speed-up grows as the decoder gets lighter relative to the encoder. A step is forward,
backward and the training's AdamW update (`pipeline.train_loop.build_optimizer`: the fused kernel) on a fixed
batch. ViT-S/16 at 224 px with its default decoder (256 wide, 4 deep), and again with a 2-block decoder
(the MAE paper, Table 1a: 1–2 decoder blocks fine-tune as well as 8); batch 32 (`--quick`: 16). The
optimizer step is a fixed cost per step, so small batches understate the speed-up. Steps at the two ratios
alternate on one model, so a busy moment on the machine hits both; the speed-up is the median of the
pairs' ratios. On a GPU the step runs under bf16 autocast and the peak memory is reported too, and the
step is measured again under `torch.compile` (as `pretrain.compile` runs it there; on CPU the compile
alone would take longer than the whole benchmark).

    python -m benchmarks.mae_step [--quick]
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.common import Row, main, tiny
from pipeline.models.mae import build_mae
from pipeline.train_loop import build_optimizer

log = logging.getLogger(__name__)

# The target (read by run_all.py): ViT-S/16 with its default decoder, ≥ 2.5× faster at 75 % masked.
TARGETS = {"mae_step_speedup_ratio_vs_mask_0.0": (">=", 2.5)}


@dataclass
class Paired:
    """Step times at the two mask ratios, taken alternately on one model (so both see the same load)."""

    masked_s: float  # median seconds per step at mask ratio 0.75
    full_s: float  # ... at 0.0
    speedup: float  # median over the pairs of full / masked
    peak_masked_mb: float  # peak GPU memory (NaN on CPU)
    peak_full_mb: float


def paired_steps(
    name: str,
    img_size: int,
    batch: int,
    repeats: int,
    device: torch.device,
    decoder_depth: int | None = None,
    compile_: bool = False,
) -> Paired:
    """Alternate training steps at mask ratio 0.75 and 0.0 on one model and optimizer, after one untimed
    step of each (with `compile_`, the model under `torch.compile`: those steps compile it, one graph per
    ratio); a step's cost does not depend on the weights' values, only on the ratio."""
    torch.manual_seed(0)
    model = build_mae(name, img_size=img_size, decoder_depth=decoder_depth).to(device)
    forward = torch.compile(model) if compile_ else model
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, device=device)
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    on_gpu = device.type == "cuda"
    seconds: dict[float, list[float]] = {0.75: [], 0.0: []}
    peak = {0.75: float("nan"), 0.0: float("nan")}

    def step(mask_ratio: float) -> float:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = forward(imgs, mask_ratio).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()
            peak[mask_ratio] = torch.cuda.max_memory_allocated() / 2**20
        return time.perf_counter() - start

    step(0.75), step(0.0)  # warm-up
    for _ in range(repeats):
        for mask_ratio, out in seconds.items():
            out.append(step(mask_ratio))
    log.info("%s decoder depth %s: %s", name, decoder_depth, seconds)
    pairs = [full / masked for masked, full in zip(seconds[0.75], seconds[0.0], strict=True)]
    return Paired(
        masked_s=statistics.median(seconds[0.75]),
        full_s=statistics.median(seconds[0.0]),
        speedup=statistics.median(pairs),
        peak_masked_mb=peak[0.75],
        peak_full_mb=peak[0.0],
    )


def run(quick: bool = False) -> list[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tiny():
        name, size, batch, repeats = "mae_vit_micro_patch4", 32, 4, 2
    else:
        name, size, batch, repeats = "mae_vit_small_patch16", 224, 16 if quick else 32, 5 if quick else 7
    if device.type == "cuda" and not quick:
        batch = 128
    default = paired_steps(name, size, batch, repeats, device)
    light = paired_steps(name, size, batch, repeats, device, decoder_depth=2)
    rows: list[Row] = [
        ("mae_step_batch", float(batch)),
        ("mae_step_s_at_mask_0.75", default.masked_s),
        ("mae_step_s_at_mask_0.0", default.full_s),
        ("mae_images_per_s_at_mask_0.75", batch / default.masked_s),
        ("mae_step_speedup_ratio_vs_mask_0.0", default.speedup),
        ("mae_step_speedup_ratio_vs_mask_0.0_decoder_depth_2", light.speedup),
    ]
    if device.type == "cuda":
        compiled = paired_steps(name, size, batch, repeats, device, compile_=True)
        rows += [
            ("mae_peak_gpu_mb_at_mask_0.75", default.peak_masked_mb),
            ("mae_peak_gpu_mb_at_mask_0.0", default.peak_full_mb),
            ("mae_compiled_images_per_s_at_mask_0.75", batch / compiled.masked_s),
            ("mae_compiled_speedup_ratio_vs_eager", default.masked_s / compiled.masked_s),
            ("mae_compiled_step_speedup_ratio_vs_mask_0.0", compiled.speedup),
        ]
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
