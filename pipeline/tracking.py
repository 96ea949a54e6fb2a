"""Runs logged to MLflow and TensorBoard, beside the run's own metrics.jsonl.

`tracking.mlflow_uri` and `tracking.tensorboard_dir` each turn on one sink; with neither set, `open_tracker`
gives a tracker that does nothing, so callers never branch on it. One tracker follows one run (a pipeline
run, a pretraining, a sweep trial) and logs, as they arrive:

    log_config(config)        the resolved config, secrets redacted: MLflow params, a TensorBoard text
    log_metrics(lines)        metrics.jsonl lines (`step` + numbers); steps already logged are skipped
    log_summary(summary)      summary.json's numbers: MLflow metrics, TensorBoard `summary/*` scalars
    log_files(run_dir)        config.yaml, summary.json, evaluation.json, metrics.jsonl, report/:
                              MLflow artifacts; the report's PNGs as TensorBoard images

A tracker is keyed by the run it follows (`key`: the run directory, or sweep + trial): reopening the same
key, as a resumed run does, continues the same MLflow run and the same TensorBoard folder, and logs only
the steps past those already there.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from pipeline.core.config import Config, TrackingConfig, dump_config, flatten_dotted
from pipeline.core.errors import UserInputError
from pipeline.core.runs import CONFIG_NAME, EVALUATION_NAME, METRICS_NAME, SUMMARY_NAME
from pipeline.core.storage import exists, join, url_to_fs

log = logging.getLogger(__name__)

RUN_FILES = (CONFIG_NAME, SUMMARY_NAME, EVALUATION_NAME, METRICS_NAME)
REPORT_DIR = "report"
KEY_TAG = "maskdiet.key"  # MLflow tag that finds a run again when it is resumed
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value
MLFLOW_BATCH = 100  # params per log_batch call (MLflow's limit); metrics go 1000 at a time


def numbers(record: dict[str, Any], skip: tuple[str, ...] = ("step", "time")) -> dict[str, float]:
    """The finite numeric values of a record (a metrics line, a summary), without `skip` keys."""
    out = {}
    for key, value in record.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Sink(Protocol):
    """One place runs are logged to."""

    last_step: int  # the highest metrics step logged so far (-1: none)

    def params(self, values: dict[str, str]) -> None: ...
    def text(self, name: str, body: str) -> None: ...
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def files(self, folder: Path) -> None: ...
    def close(self, ok: bool) -> None: ...


# ---------------------------------------------------------------------------------------------- MLflow


def mlflow_client(uri: str) -> Any:
    """An `MlflowClient` for `uri`, with a clear error when MLflow is not installed.

    MLflow 3 refuses its plain-folder backend unless MLFLOW_ALLOW_FILE_STORE is set; `tracking.mlflow_uri:
    file:///...` is how this project works offline, so for a folder URI that switch is set (in this
    process's environment, where MLflow reads it)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise UserInputError(
            'tracking.mlflow_uri is set but MLflow is not installed: pip install "maskdiet[mlflow]"'
        ) from error
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


class MlflowSink:
    """One MLflow run, found again by its key tag when the same run is tracked again."""

    def __init__(self, uri: str, experiment: str, run_name: str, key: str, tags: dict[str, str]):
        from mlflow.entities import Metric, Param

        self._Metric, self._Param = Metric, Param
        self.client = mlflow_client(uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        key_filter = f"tags.`{KEY_TAG}` = '{key.replace(chr(39), '')}'"
        runs = self.client.search_runs([experiment_id], filter_string=key_filter, max_results=1)
        if runs:
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "loss")
            self.last_step = max((m.step for m in history), default=-1)
        else:
            run = self.client.create_run(experiment_id, run_name=run_name, tags={KEY_TAG: key, **tags})
            self.run_id = run.info.run_id
            self.last_step = -1
        log.info("tracking in MLflow: %s, run %s", uri, self.run_id)

    def params(self, values: dict[str, str]) -> None:
        known = self.client.get_run(self.run_id).data.params
        fresh = [self._Param(k, v) for k, v in values.items() if k not in known]
        changed = sorted(k for k, v in values.items() if k in known and known[k] != v)
        if changed:  # MLflow params are write-once; a resumed run keeps the first values
            log.warning("MLflow run %s keeps its first values of %s", self.run_id, ", ".join(changed))
        for i in range(0, len(fresh), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=fresh[i : i + MLFLOW_BATCH])

    def text(self, name: str, body: str) -> None:
        self.client.log_text(self.run_id, body, f"{name}.txt")

    def scalars(self, values: dict[str, float], step: int) -> None:
        stamp = int(1000 * time.time())
        metrics = [self._Metric(k, v, stamp, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def files(self, folder: Path) -> None:
        for item in sorted(folder.iterdir()):
            if item.is_dir():
                self.client.log_artifacts(self.run_id, str(item), item.name)
            else:
                self.client.log_artifact(self.run_id, str(item))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


# ---------------------------------------------------------------------------------------------- TensorBoard


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of `folder`, by tag: [(step, value), ...] by step.

    Event files are TFRecord files (per record: an 8-byte length, its 4-byte CRC, the serialised `Event`, a
    4-byte CRC); the Event protobuf comes with tensorboardX."""
    from tensorboardX.proto import event_pb2

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {tag: sorted(series, key=lambda item: item[0]) for tag, series in found.items()}


class TensorBoardSink:
    """One TensorBoard folder per run: `<tensorboard_dir>/<run_name>`. A local folder is written as events
    arrive; an object-store one is written locally and uploaded when the run closes."""

    def __init__(self, root: str, run_name: str, storage_options: dict[str, Any]):
        from tensorboardX import SummaryWriter

        self.url = join(root, run_name)
        self.fs, self.remote_path = url_to_fs(self.url, storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if "file" in protocols or "local" in protocols:
            self.folder = Path(self.remote_path)
            self._temp = None
        else:
            self._temp = tempfile.TemporaryDirectory(prefix="maskdiet-tb-")
            self.folder = Path(self._temp.name)
            if exists(self.url, storage_options):
                self.fs.get(self.remote_path.rstrip("/") + "/", str(self.folder) + "/", recursive=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        steps = [step for series in read_scalars(self.folder).values() for step, _ in series]
        self.last_step = max(steps, default=-1)
        # a second writer in the same second would otherwise take the same file name and replace it
        self.writer = SummaryWriter(logdir=str(self.folder), filename_suffix=f".{uuid.uuid4().hex[:8]}")
        log.info("tracking in TensorBoard: %s", self.url)

    def params(self, values: dict[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(values.items()))
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{table}")

    def text(self, name: str, body: str) -> None:
        self.writer.add_text(name, body)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def files(self, folder: Path) -> None:
        for png in sorted((folder / REPORT_DIR).glob("*.png")) if (folder / REPORT_DIR).is_dir() else []:
            image = np.asarray(Image.open(png).convert("RGB"))
            self.writer.add_image(f"report/{png.stem}", image, dataformats="HWC")

    def close(self, ok: bool) -> None:
        self.writer.close()
        if self._temp is not None:
            self.fs.put(str(self.folder) + "/", self.remote_path.rstrip("/") + "/", recursive=True)
            self._temp.cleanup()


# ---------------------------------------------------------------------------------------------- the tracker


class Tracker:
    """Logs one run to every configured sink; with none, every call does nothing."""

    def __init__(self, sinks: list[Sink], summary_prefix: str = "summary/"):
        self.sinks = sinks
        self.summary_prefix = summary_prefix

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def log_config(self, config: Config, extra: dict[str, Any] | None = None) -> None:
        """The config as flat `section.key` params (secrets redacted), and the YAML as text."""
        if not self.sinks:
            return
        flat = flatten_dotted(config.redacted()) | dict(extra or {})
        values = {k: str(v)[:MLFLOW_PARAM_CHARS] for k, v in flat.items()}
        for sink in self.sinks:
            sink.params(values)
            sink.text("config_yaml", dump_config(config))

    def log_metrics(self, lines: list[dict[str, Any]], prefix: str = "") -> None:
        """metrics.jsonl lines (each with `step`), each sink taking only the steps it has not logged."""
        for sink in self.sinks:
            for line in lines:
                step = int(line.get("step", -1))
                if step <= sink.last_step:
                    continue
                values = {prefix + k: v for k, v in numbers(line).items()}
                if values:
                    sink.scalars(values, step)
                sink.last_step = step

    def log_summary(self, summary: dict[str, Any]) -> None:
        """summary.json's numbers, at the run's last step."""
        for sink in self.sinks:
            values = {self.summary_prefix + k: v for k, v in numbers(summary, skip=()).items()}
            sink.scalars(values, max(sink.last_step, 0))
            sink.text("summary", summary_markdown(summary))

    def log_files(self, run_dir: str, storage_options: dict[str, Any] | None = None) -> None:
        """The run's files (those that exist), copied to a local folder first when the run is remote."""
        if not self.sinks:
            return
        fs, path = url_to_fs(run_dir, storage_options)
        with tempfile.TemporaryDirectory(prefix="maskdiet-track-") as temp:
            folder = Path(temp)
            for name in RUN_FILES:
                if fs.exists(f"{path}/{name}"):
                    (folder / name).write_bytes(fs.cat_file(f"{path}/{name}"))
            report = f"{path}/{REPORT_DIR}"
            if fs.isdir(report):
                (folder / REPORT_DIR).mkdir()
                for item in fs.ls(report, detail=False):
                    if fs.isfile(item):
                        (folder / REPORT_DIR / Path(item).name).write_bytes(fs.cat_file(item))
            for sink in self.sinks:
                sink.files(folder)

    def close(self, ok: bool = True) -> None:
        for sink in self.sinks:
            try:
                sink.close(ok)
            except Exception as error:  # a tracking server gone at the end must not fail the run
                log.warning("could not close a tracking run: %s", error)
        self.sinks = []


def open_tracker(
    tracking: TrackingConfig,
    run_name: str,
    key: str,
    storage_options: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Tracker:
    """A tracker for the run `key` (shown as `run_name`) per `tracking`; a no-op one when nothing is set."""
    sinks: list[Sink] = []
    if tracking.mlflow_uri:
        sinks.append(MlflowSink(tracking.mlflow_uri, tracking.experiment, run_name, key, dict(tags or {})))
    if tracking.tensorboard_dir:
        sinks.append(TensorBoardSink(tracking.tensorboard_dir, run_name, dict(storage_options or {})))
    return Tracker(sinks)


@contextmanager
def tracked(
    tracking: TrackingConfig,
    run_name: str,
    key: str,
    storage_options: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Tracker]:
    """`open_tracker` for the block; the runs end FINISHED, or FAILED when the block raises."""
    tracker = open_tracker(tracking, run_name, key, storage_options, tags)
    try:
        yield tracker
    except BaseException:
        tracker.close(ok=False)
        raise
    tracker.close(ok=True)


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.json as a two-column Markdown table (TensorBoard's text tab renders it)."""
    buffer = io.StringIO()
    buffer.write("| | |\n|---|---|\n")
    for key, value in summary.items():
        buffer.write(f"| {key} | {value} |\n")
    return buffer.getvalue()
