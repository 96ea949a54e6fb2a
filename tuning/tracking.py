"""Sweep trials logged to MLflow / TensorBoard: one tracked run per trial, through a Tune callback.

Tune's own MLflow and TensorBoard callbacks log what Tune sees, into Tune's experiment folder; this one uses
the same `pipeline.tracking` sinks as `maskdiet run`, so a trial lands where the team's runs do
(`tracking.tensorboard_dir/<sweep>/<trial_id>`, the MLflow experiment `tracking.experiment`) with the same
keys: the trial's whole config as params, each report's metrics by training step, and its final metrics.
It runs in the sweep's driver, where Tune calls callbacks, so the trials' workers need no tracking setup.
A resumed sweep continues each trial's tracked run (keyed by sweep folder and trial id).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

from pipeline.core.config import Config
from pipeline.core.storage import join
from pipeline.tracking import Tracker, open_tracker
from pipeline.train_loop import REPORTED_METRICS
from tuning.space import trial_config

log = logging.getLogger(__name__)


class TrackTrials(Callback):
    """Opens a tracker when a trial first reports, logs each report, closes it when the trial ends."""

    def __init__(self, config: Config, base: dict[str, Any], sweep_dir: str, sweep_name: str):
        self.tracking = config.tracking
        self.storage_options = config.data.storage_options
        self.base = base
        self.sweep_dir = sweep_dir
        self.sweep_name = sweep_name
        self.trackers: dict[str, Tracker] = {}

    def _tracker(self, trial: Any) -> Tracker:
        if trial.trial_id not in self.trackers:
            tracker = open_tracker(
                self.tracking,
                run_name=f"{self.sweep_name}/{trial.trial_id}",
                key=join(self.sweep_dir, "trials", trial.trial_id),
                storage_options=self.storage_options,
                tags={"maskdiet.sweep": self.sweep_name, "maskdiet.trial": trial.trial_id},
            )
            params = {f"trial.{k}": v for k, v in (trial.config or {}).items()}
            tracker.log_config(trial_config(self.base, trial.config or {}), extra=params)
            self.trackers[trial.trial_id] = tracker
        return self.trackers[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        line = {k: result[k] for k in (*REPORTED_METRICS, "step") if k in result}
        if "step" in line:
            self._tracker(trial).log_metrics([line])

    def _finish(self, trial: Any, ok: bool) -> None:
        tracker = self.trackers.pop(trial.trial_id, None)
        if tracker is not None:
            last = dict(trial.last_result or {})
            tracker.log_summary({k: last[k] for k in (*REPORTED_METRICS, "step") if k in last})
            tracker.close(ok)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, ok=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, ok=False)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial_id in list(self.trackers):
            self.trackers.pop(trial_id).close(ok=False)  # stopped without an end (interrupted sweep)
