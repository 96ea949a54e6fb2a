"""`Trainer`: the `TorchTrainer` every Ray Train job of maskdiet runs (MAE pretraining, proxies).

Its own module because `ray.train.torch` takes seconds to import, and `pipeline.core.ray_compat` is imported
by everything that starts Ray."""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer

from pipeline.core.ray_compat import PG_CLEANER_CALLBACK, without_callback


class Trainer(TorchTrainer):
    """A `TorchTrainer` that leaves out Ray Train's placement-group cleaner when there is no State API for it
    to poll (a local Ray started without its dashboard): it would log a warning every second and clean
    nothing (see `ray_compat.PG_CLEANER_CALLBACK`; the override is of Train's private
    `_create_default_callbacks`, checked by `tests/pipeline/core/test_ray_compat.py`)."""

    def __init__(self, *args: Any, state_api: bool = True, **kwargs: Any) -> None:
        self._state_api = state_api
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return callbacks if self._state_api else without_callback(callbacks, PG_CLEANER_CALLBACK)
