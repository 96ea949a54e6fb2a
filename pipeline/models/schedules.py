"""Schedules over a pretraining run: the mask ratio and the learning rate at a step.

- Mask ratio: `constant`, `linear`, `cosine` or `step` from `ratio` (step 0) to `ratio_end` (the last step);
  `step` switches at the fraction `step_at` of the run.
- Learning rate: linear warmup over `warmup_steps` to the peak, then `cosine` or `linear` decay to 0 at
  `steps`, or `constant`.

Each is chosen by name from a small table (`RATIO_SCHEDULES`, `LR_SCHEDULES`); a new one is a function and
a table row.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.core.config import MaskConfig, PretrainConfig
from pipeline.core.errors import UserInputError

# progress t in [0, 1] → the fraction of the way from the start value to the end value
RATIO_SCHEDULES: dict[str, Callable[[float, MaskConfig], float]] = {
    "constant": lambda t, c: 0.0,
    "linear": lambda t, c: t,
    "cosine": lambda t, c: 0.5 * (1.0 - math.cos(math.pi * t)),
    "step": lambda t, c: 1.0 if t >= c.step_at else 0.0,
}

# progress t in [0, 1] after warmup → the fraction of the peak learning rate
LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 1.0,
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
}


def _clamp(t: float) -> float:
    return min(max(t, 0.0), 1.0)


def mask_ratio_at(config: MaskConfig, step: int, total: int) -> float:
    """The mask ratio at `step` of `total`: `ratio` at step 0, `ratio_end` at the last step."""
    if config.schedule == "constant" or config.ratio_end is None:
        return config.ratio
    shape = RATIO_SCHEDULES.get(config.schedule)
    if shape is None:
        raise UserInputError(
            f"unknown mask schedule {config.schedule!r}; expected one of {', '.join(RATIO_SCHEDULES)}"
        )
    fraction = shape(_clamp(step / max(total - 1, 1)), config)
    if fraction in (0.0, 1.0):  # exactly the configured ratio at the ends: num_masked rounds it down
        return config.ratio_end if fraction else config.ratio
    return config.ratio + (config.ratio_end - config.ratio) * fraction


def lr_at(config: PretrainConfig, peak_lr: float, step: int) -> float:
    """Learning rate at `step`: linear warmup to `peak_lr`, then the `lr_schedule`'s decay over the rest."""
    if config.warmup_steps and step < config.warmup_steps:
        return peak_lr * (step + 1) / config.warmup_steps
    shape = LR_SCHEDULES.get(config.lr_schedule)
    if shape is None:
        raise UserInputError(
            f"unknown learning-rate schedule {config.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}"
        )
    t = _clamp((step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1))
    return peak_lr * shape(t)
