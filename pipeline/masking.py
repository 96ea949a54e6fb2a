"""Mask strategies and schedules for MAE pretraining.

A strategy turns a batch into per-patch **noise** (N, L): the model keeps the `len_keep` lowest-noise
patches and masks the rest (`pipeline.mae.mask_from_noise`). Every strategy masks exactly
`L - num_kept(L, ratio)` patches per sample, so the encoder's sequence length is the same across a batch.

- `random`: uniform noise (MAE).
- `block`: BEiT/SimMIM-style block-wise masking: rectangles of random area and aspect ratio are masked until
  the count is reached (the last block trimmed, any shortfall topped up at random), so masked regions are
  contiguous.
- `hard-patch`: HPM (Wang et al. 2023). An auxiliary head predicts each patch's reconstruction loss; the
  predicted-hardest patches make up a share of the mask that grows over training (easy-to-hard), the
  rest is random. At share 1 the mask is exactly the top predicted patches.

Schedules: mask ratio constant / linear / cosine / step between `ratio` and `ratio_end`; learning rate with
linear warmup then cosine / linear / constant.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.config import MaskConfig, PretrainConfig
from pipeline.mae import num_kept


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Masked patches per sample at `mask_ratio` (the complement of `num_kept`)."""
    return num_patches - num_kept(num_patches, mask_ratio)


# ---------------------------------------------------------------------------------------------- strategies


def noise_from_mask(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask (N, L), True = masked, → noise whose argsort puts every masked patch after every kept
    one (ties broken at random, so the visible order is still shuffled)."""
    jitter = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device) * 0.5
    return mask.float() + jitter


def random_mask(n: int, length: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, L) bool with exactly `count` True per row, chosen uniformly."""
    scores = torch.rand(n, length, generator=generator)
    top = torch.argsort(scores, dim=1, descending=True)[:, :count]
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask.scatter_(1, top, True)
    return mask


def block_mask(
    n: int,
    grid: int,
    count: int,
    rng: np.random.Generator,
    min_block: int = 4,
    aspect: float = 0.3,
) -> torch.Tensor:
    """(N, grid*grid) bool with exactly `count` True per row, made of rectangles (BEiT's block masking).

    Each rectangle has area in [min_block, remaining] patches and aspect ratio in [aspect, 1/aspect]
    (log-uniform); new blocks add only unmasked patches. When a block would overshoot, only as many of its
    patches as needed are added (in raster order, so it stays a contiguous run); after a bounded number of
    tries any shortfall is filled at random.
    """
    length = grid * grid
    assert 0 <= count <= length, f"count {count} outside [0, {length}]"
    out = np.zeros((n, grid, grid), dtype=bool)
    log_aspect = (math.log(aspect), math.log(1.0 / aspect))
    for i in range(n):
        m = out[i]
        tries = 0
        while m.sum() < count and tries < 100:
            tries += 1
            remaining = count - int(m.sum())
            area = rng.uniform(min(min_block, remaining), max(min_block, min(remaining, length // 2)))
            ratio = math.exp(rng.uniform(*log_aspect))
            h = round(math.sqrt(area * ratio))
            w = round(math.sqrt(area / ratio))
            if not (1 <= h <= grid and 1 <= w <= grid):
                continue
            top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
            region = np.zeros_like(m)
            region[top : top + h, left : left + w] = True
            new = region & ~m
            extra = int(new.sum())
            if extra == 0:
                continue
            if extra > remaining:
                ys, xs = np.nonzero(new)
                new = np.zeros_like(m)
                new[ys[:remaining], xs[:remaining]] = True
            m |= new
        short = count - int(m.sum())
        if short > 0:
            free = np.flatnonzero(~m.reshape(-1))
            m.reshape(-1)[rng.choice(free, size=short, replace=False)] = True
    return torch.from_numpy(out.reshape(n, length))


def hard_patch_mask(
    predicted: torch.Tensor, count: int, hard_share: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, L) bool: the `round(hard_share * count)` patches with the highest predicted loss, plus random
    others up to `count`. predicted: (N, L), higher = harder."""
    n, length = predicted.shape
    hard = round(hard_share * count)
    order = torch.argsort(predicted.detach().float().cpu(), dim=1, descending=True)
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask.scatter_(1, order[:, :hard], True)
    rest = count - hard
    if rest > 0:
        scores = torch.rand(n, length, generator=generator)
        scores[mask] = -1.0  # never re-pick a hard patch
        mask.scatter_(1, torch.argsort(scores, dim=1, descending=True)[:, :rest], True)
    return mask


class Masker:
    """Chooses each batch's mask for a `MaskConfig`; call with (N, L, ratio, progress in [0, 1], predicted
    per-patch loss or None) → noise (N, L) for `MaskedAutoencoder.forward`.

    Holds its own seeded generators, so a run's masks are reproducible for a seed.
    """

    def __init__(self, config: MaskConfig, grid: int, seed: int = 0) -> None:
        self.config = config
        self.grid = grid
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    @property
    def needs_prediction(self) -> bool:
        return self.config.strategy == "hard-patch"

    def hard_share(self, progress: float) -> float:
        """Easy-to-hard: the share of the mask chosen by predicted loss, linear over training."""
        c = self.config
        return c.hard_share_start + (c.hard_share_end - c.hard_share_start) * min(max(progress, 0.0), 1.0)

    def mask(
        self, n: int, ratio: float, progress: float = 0.0, predicted: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, L) bool, True = masked, exactly `num_masked(L, ratio)` per row."""
        length = self.grid * self.grid
        count = num_masked(length, ratio)
        strategy = self.config.strategy
        if strategy == "random":
            return random_mask(n, length, count, self.generator)
        if strategy == "block":
            return block_mask(n, self.grid, count, self.rng, self.config.block_min_patches)
        if strategy == "hard-patch":
            if predicted is None:
                raise ValueError("hard-patch masking needs the predicted per-patch loss")
            return hard_patch_mask(predicted, count, self.hard_share(progress), self.generator)
        raise ValueError(f"unknown mask strategy {strategy!r}; expected random, block or hard-patch")

    def __call__(
        self, n: int, ratio: float, progress: float = 0.0, predicted: torch.Tensor | None = None
    ) -> torch.Tensor:
        return noise_from_mask(self.mask(n, ratio, progress, predicted), self.generator)


# ---------------------------------------------------------------------------------------------- schedules


def mask_ratio_at(config: MaskConfig, step: int, total: int) -> float:
    """The mask ratio at `step` of `total`: `ratio` at step 0, `ratio_end` at the last step."""
    if config.schedule == "constant" or config.ratio_end is None:
        return config.ratio
    t = min(max(step / max(total - 1, 1), 0.0), 1.0)
    start, end = config.ratio, config.ratio_end
    if config.schedule == "linear":
        return start + (end - start) * t
    if config.schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    if config.schedule == "step":
        return end if t >= config.step_at else start
    raise ValueError(f"unknown mask schedule {config.schedule!r}")


def lr_at(config: PretrainConfig, peak_lr: float, step: int) -> float:
    """Learning rate at `step`: linear warmup to `peak_lr`, then cosine / linear decay to 0, or constant."""
    total = config.steps
    if config.warmup_steps and step < config.warmup_steps:
        return peak_lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return peak_lr
    t = (step - config.warmup_steps) / max(total - config.warmup_steps, 1)
    t = min(max(t, 0.0), 1.0)
    if config.lr_schedule == "linear":
        return peak_lr * (1.0 - t)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * t))
