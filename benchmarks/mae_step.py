"""MAE training-step time at mask ratio 0.75 vs 0.0 for the same model (the MAE paper: ≥3× faster at 75 %).

The encoder sees only the visible quarter of the patches at 0.75; the light decoder sees all of them at
both ratios, so the speed-up grows as the decoder gets lighter relative to the encoder. A step is forward,
backward and an AdamW update on a fixed batch. ViT-S/16 at 224 px with its default decoder (256 wide,
4 deep), and again with a 2-block decoder (the MAE paper, Table 1a: 1–2 decoder blocks fine-tune as well
as 8); batch 32 (`--quick`: 16). The optimizer step is a fixed cost per step, so small batches understate
the speed-up. On a GPU the step runs under bf16 autocast and the peak memory is reported too.

    python -m benchmarks.mae_step [--quick]
"""

from __future__ import annotations

import logging

import torch

from benchmarks.common import Row, main, ratio, repeat, tiny
from pipeline.mae import build_mae

log = logging.getLogger(__name__)

# The target (read by run_all.py): ViT-S/16 with its default decoder, ≥ 2.5× faster at 75 % masked.
TARGETS = {"mae_step_speedup_ratio_vs_mask_0.0": (">=", 2.5)}


def _step_time(
    name: str,
    img_size: int,
    batch: int,
    mask_ratio: float,
    repeats: int,
    device: torch.device,
    decoder_depth: int | None = None,
) -> tuple[float, float]:
    """(median seconds per training step, peak GPU memory in MB or NaN on CPU)."""
    torch.manual_seed(0)
    model = build_mae(name, img_size=img_size, decoder_depth=decoder_depth).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    imgs = torch.randn(batch, 3, img_size, img_size, device=device)
    on_gpu = device.type == "cuda"

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(imgs, mask_ratio).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    timing = repeat(step, repeats=repeats, warmup=1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else float("nan")
    log.info("%s ratio %.2f decoder depth %s: %s", name, mask_ratio, decoder_depth, timing.seconds)
    return timing.median, peak


def run(quick: bool = False) -> list[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tiny():
        name, size, batch, repeats = "mae_vit_micro_patch4", 32, 4, 2
    else:
        name, size, batch, repeats = "mae_vit_small_patch16", 224, 16 if quick else 32, 3 if quick else 5
    if device.type == "cuda" and not quick:
        batch = 128
    masked, peak_masked = _step_time(name, size, batch, 0.75, repeats, device)
    full, peak_full = _step_time(name, size, batch, 0.0, repeats, device)
    light_masked, _ = _step_time(name, size, batch, 0.75, repeats, device, decoder_depth=2)
    light_full, _ = _step_time(name, size, batch, 0.0, repeats, device, decoder_depth=2)
    rows: list[Row] = [
        ("mae_step_batch", float(batch)),
        ("mae_step_s_at_mask_0.75", masked),
        ("mae_step_s_at_mask_0.0", full),
        ("mae_images_per_s_at_mask_0.75", batch / masked),
        ("mae_step_speedup_ratio_vs_mask_0.0", ratio(full, masked)),
        ("mae_step_speedup_ratio_vs_mask_0.0_decoder_depth_2", ratio(light_full, light_masked)),
    ]
    if device.type == "cuda":
        rows += [("mae_peak_gpu_mb_at_mask_0.75", peak_masked), ("mae_peak_gpu_mb_at_mask_0.0", peak_full)]
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
