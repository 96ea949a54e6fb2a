"""Mask strategies for MAE pretraining.

A strategy turns a batch into per-patch **noise** (N, L): the model keeps the `len_keep` lowest-noise
patches and masks the rest (`pipeline.models.mae.mask_from_noise`). Every strategy masks exactly
`L - num_kept(L, ratio)` patches per sample, so the encoder's sequence length is the same across a batch.

- `random`: uniform noise (MAE).
- `block`: BEiT/SimMIM-style block-wise masking: rectangles of random area and aspect ratio are masked until
  the count is reached (the last block trimmed, any shortfall topped up at random), so masked regions are
  contiguous.
- `hard-patch`: HPM (Wang et al. 2023). An auxiliary head predicts each patch's reconstruction loss; the
  predicted-hardest patches make up a share of the mask that grows over training (easy-to-hard), the
  rest is random. At share 1 the mask is exactly the top predicted patches.

The mask-ratio and learning-rate schedules are in `pipeline.models.schedules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from pipeline.core.config import MaskConfig
from pipeline.core.errors import UserInputError
from pipeline.models.mae import num_kept


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Masked patches per sample at `mask_ratio` (the complement of `num_kept`)."""
    return num_patches - num_kept(num_patches, mask_ratio)


# ---------------------------------------------------------------------------------------------- strategies


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers on `device`, from `generator` when given (it must live on that device)."""
    return torch.rand(shape, generator=generator, device=generator.device if generator else device)


def noise_from_mask(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask (N, L), True = masked, → noise whose argsort puts every masked patch after every kept
    one (ties broken at random, so the visible order is still shuffled). Made where the mask is."""
    return mask.float() + _rand(tuple(mask.shape), generator, mask.device).to(mask.device) * 0.5


def random_mask(
    n: int, length: int, count: int, generator: torch.Generator | None = None, device: str = "cpu"
) -> torch.Tensor:
    """(N, L) bool with exactly `count` True per row, chosen uniformly (on the generator's device)."""
    scores = _rand((n, length), generator, torch.device(device))
    top = torch.argsort(scores, dim=1, descending=True)[:, :count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


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
    others up to `count`. predicted: (N, L), higher = harder. Chosen where `predicted` is (the training
    device: no copy to the host, no sync); `generator`, when given, lives there too."""
    n, length = predicted.shape
    hard = round(hard_share * count)
    order = torch.argsort(predicted.detach().float(), dim=1, descending=True)
    mask = torch.zeros(n, length, dtype=torch.bool, device=predicted.device)
    mask.scatter_(1, order[:, :hard], True)
    rest = count - hard
    if rest > 0:
        scores = _rand((n, length), generator, predicted.device).masked_fill_(mask, -1.0)  # hard ones: never
        mask.scatter_(1, torch.argsort(scores, dim=1, descending=True)[:, :rest], True)
    return mask


class Masker:
    """Chooses each batch's mask for a `MaskConfig`; call with (N, L, ratio, progress in [0, 1], predicted
    per-patch loss or None) → noise (N, L) for `MaskedAutoencoder.forward`.

    Holds its own seeded generators, so a run's masks are reproducible for a seed. Random and hard-patch
    masks and the noise are drawn on `device` (the training device: nothing waits for a host-made mask);
    block masks are drawn on the host (a sequential search per row) and sent over.
    """

    def __init__(
        self, config: MaskConfig, grid: int, seed: int = 0, device: str | torch.device = "cpu"
    ) -> None:
        self.config = config
        self.grid = grid
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
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
        strategy = STRATEGIES.get(self.config.strategy)
        if strategy is None:
            raise UserInputError(
                f"unknown mask strategy {self.config.strategy!r}; expected one of {', '.join(STRATEGIES)}"
            )
        return strategy(self, n, count, progress, predicted)

    def __call__(
        self, n: int, ratio: float, progress: float = 0.0, predicted: torch.Tensor | None = None
    ) -> torch.Tensor:
        return noise_from_mask(self.mask(n, ratio, progress, predicted), self.generator)


# Each strategy: (masker, N, count masked per row, progress, predicted per-patch loss) → (N, L) bool mask.
def _random(m: Masker, n: int, count: int, progress: float, predicted: torch.Tensor | None) -> torch.Tensor:
    return random_mask(n, m.grid * m.grid, count, m.generator)


def _block(m: Masker, n: int, count: int, progress: float, predicted: torch.Tensor | None) -> torch.Tensor:
    mask = block_mask(n, m.grid, count, m.rng, m.config.block_min_patches)
    return mask.to(m.device, non_blocking=True) if m.device.type != "cpu" else mask


def _hard_patch(
    m: Masker, n: int, count: int, progress: float, predicted: torch.Tensor | None
) -> torch.Tensor:
    if predicted is None:
        raise ValueError("hard-patch masking needs the predicted per-patch loss")
    return hard_patch_mask(predicted, count, m.hard_share(progress), m.generator)


STRATEGIES: dict[str, Callable[[Masker, int, int, float, torch.Tensor | None], torch.Tensor]] = {
    "random": _random,
    "block": _block,
    "hard-patch": _hard_patch,
}
