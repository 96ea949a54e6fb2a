"""Mask strategies (exact counts, contiguous blocks, hard-patch picks the top predicted) and schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.core.config import MaskConfig
from pipeline.models.mae import build_mae, num_kept
from pipeline.models.masking import (
    Masker,
    block_mask,
    hard_patch_mask,
    num_masked,
    random_mask,
)


@pytest.mark.parametrize("strategy", ["random", "block", "hard-patch"])
@pytest.mark.parametrize("ratio", [0.4, 0.75, 0.9])
def test_each_strategy_masks_exactly_the_requested_count(strategy: str, ratio: float) -> None:
    masker = Masker(MaskConfig(strategy=strategy, hard_share_end=0.5), grid=8, seed=3)
    predicted = torch.rand(16, 64) if strategy == "hard-patch" else None
    mask = masker.mask(16, ratio, progress=0.7, predicted=predicted)
    assert mask.shape == (16, 64)
    assert torch.all(mask.sum(dim=1) == num_masked(64, ratio))
    # The noise handed to the model keeps exactly the unmasked patches.
    noise = masker(16, ratio, progress=0.7, predicted=predicted)
    assert noise.shape == (16, 64)


def test_masker_noise_drives_the_model_to_the_same_mask() -> None:
    model = build_mae("mae_vit_micro_patch4")
    masker = Masker(MaskConfig(strategy="block"), grid=8, seed=0)
    wanted = masker.mask(2, 0.75)
    from pipeline.models.masking import noise_from_mask

    _, mask, _ = model.forward_encoder(torch.randn(2, 3, 32, 32), 0.75, noise_from_mask(wanted))
    assert torch.equal(mask.bool(), wanted)
    assert num_kept(64, 0.75) == 16


def _components(mask: np.ndarray, grid: int) -> int:
    return int(ndimage.label(mask.reshape(grid, grid))[1])


def test_block_masks_are_contiguous_regions() -> None:
    rng = np.random.default_rng(0)
    grid, count = 14, num_masked(196, 0.4)
    blocks = block_mask(32, grid, count, rng, min_block=16).numpy()
    random = random_mask(32, 196, count, torch.Generator().manual_seed(0)).numpy()
    block_parts = [_components(m, grid) for m in blocks]
    random_parts = [_components(m, grid) for m in random]
    # a few blobs per sample (BEiT-style), versus dozens of scattered patches for random masking
    assert np.mean(block_parts) <= 6, block_parts
    assert np.mean(random_parts) > 3 * np.mean(block_parts)
    # a single block request at a small count is one rectangle
    one = block_mask(8, grid, 12, np.random.default_rng(1), min_block=12).numpy()
    for m in one:
        ys, xs = np.nonzero(m.reshape(grid, grid))
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert _components(m, grid) == 1
        assert box <= 2 * 12  # compact, not a scatter


def test_hard_patch_at_full_share_picks_the_top_predicted() -> None:
    predicted = torch.rand(8, 64)
    count = num_masked(64, 0.75)
    mask = hard_patch_mask(predicted, count, hard_share=1.0)
    top = torch.topk(predicted, count, dim=1).indices
    expected = torch.zeros_like(mask).scatter_(1, top, True)
    assert torch.equal(mask, expected)
    # at share 0.5 half of the mask is the top predicted, the rest is elsewhere at random
    half = hard_patch_mask(predicted, count, hard_share=0.5, generator=torch.Generator().manual_seed(0))
    top_half = torch.topk(predicted, round(0.5 * count), dim=1).indices
    assert torch.all(torch.gather(half, 1, top_half))
    assert torch.all(half.sum(dim=1) == count)


def test_hard_share_grows_easy_to_hard() -> None:
    masker = Masker(MaskConfig(strategy="hard-patch", hard_share_start=0.0, hard_share_end=0.8), 8)
    assert masker.hard_share(0.0) == 0.0
    assert masker.hard_share(1.0) == pytest.approx(0.8)
    assert masker.hard_share(0.0) < masker.hard_share(0.5) < masker.hard_share(1.0)
