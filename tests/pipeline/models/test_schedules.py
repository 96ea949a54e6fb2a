"""Mask-ratio and learning-rate schedules (pipeline/models/schedules.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.core.config import MaskConfig, PretrainConfig
from pipeline.models.schedules import lr_at, mask_ratio_at


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_ratio_schedules_hit_their_endpoints(schedule: str) -> None:
    config = MaskConfig(ratio=0.6, ratio_end=0.9, schedule=schedule)
    assert mask_ratio_at(config, 0, 100) == pytest.approx(0.6)
    assert mask_ratio_at(config, 99, 100) == pytest.approx(0.9)
    values = [mask_ratio_at(config, s, 100) for s in range(100)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))  # monotone 0.6 → 0.9
    if schedule == "step":
        assert set(np.round(values, 6)) == {0.6, 0.9}
    assert mask_ratio_at(MaskConfig(ratio=0.75), 50, 100) == 0.75


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_warms_up_then_follows_its_schedule(schedule: str) -> None:
    config = PretrainConfig(steps=100, warmup_steps=10, lr_schedule=schedule)
    assert lr_at(config, 1.0, 0) == pytest.approx(0.1)
    assert lr_at(config, 1.0, 9) == pytest.approx(1.0)
    assert lr_at(config, 1.0, 10) == pytest.approx(1.0)
    end = lr_at(config, 1.0, 100)
    assert end == pytest.approx(1.0 if schedule == "constant" else 0.0)
