"""Typed configuration for the whole pipeline.

One `Config` composes a section per component (data, decode, score, prune, pretrain, evaluate, tune,
schedule, ray). Defaults live in the embedded `defaults.yaml`; a user file and `--set dotted.key=value`
overrides are merged on top, then validated. Unknown keys are errors that name the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import copy
import importlib.resources
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": connect
    num_cpus: int | None = None  # local Ray only; None = all cores of this machine
    num_gpus: int | None = None  # local Ray only
    include_dashboard: bool = True  # Tune's early stopping frees Train resources through the State API
    data_cpu_share: float = Field(0.5, gt=0.0, lt=1.0)  # share of CPUs left to Ray Data beside Train workers


class DataConfig(_Section):
    input: str = ""  # fsspec URL of an image folder: <root>/<class>/<file>
    labels: str | None = None  # optional table (csv/parquet) with columns path,label[,class_name]
    storage_options: dict[str, Any] = Field(default_factory=dict)  # passed to fsspec; never logged
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"]
    )
    read_batch_size: int = Field(64, gt=0)  # rows per decode batch


class DecodeConfig(_Section):
    image_size: int = Field(32, ge=8)  # output is RGB uint8 image_size x image_size
    resize: Literal["center-crop", "squash"] = "center-crop"  # shorter side to size, then center crop
    max_pixels: int = Field(89_478_485, gt=0)  # larger declared dimensions are quarantined as too-large
    max_bytes: int = Field(256 * 1024 * 1024, gt=0)  # larger objects are quarantined as too-large
    background: tuple[int, int, int] = (255, 255, 255)  # fill for transparent pixels


class ScoreConfig(_Section):
    method: Literal["el2n", "grand", "forgetting", "prototype", "none"] = "el2n"
    num_models: int = Field(5, ge=1)  # K proxy models from different seeds (the paper used ~10)
    epochs: int = Field(4, ge=1)  # brief training: about a tenth of a full run, as in the paper
    model: Literal["cnn-small", "resnet18"] = "cnn-small"
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.05, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    seed: int = 0
    num_clusters: int = Field(10, ge=1)  # prototype scoring: k-means prototypes
    duplicate_threshold: float = Field(0.98, gt=0.0, le=1.0)  # cosine similarity for near-duplicates
    cache: bool = True  # reuse scores keyed by (sha256, scoring-config hash)


class PruneConfig(_Section):
    policy: Literal["keep-hard", "offset", "keep-easy", "class-balanced", "stratified", "random", "none"] = (
        "offset"
    )
    keep: float = Field(0.7, gt=0.0, le=1.0)  # fraction kept (ignored when keep_count is set)
    keep_count: int | None = Field(None, gt=0)  # absolute number kept
    offset: float = Field(0.1, ge=0.0, lt=1.0)  # hardest fraction dropped first as likely label noise
    bins: int = Field(10, ge=1)  # stratified (CCS) score bins
    seed: int = 0


class MaskConfig(_Section):
    strategy: Literal["random", "block", "hard-patch"] = "random"
    ratio: float = Field(0.75, ge=0.0, lt=1.0)  # start ratio (and the only one for 'constant')
    ratio_end: float | None = Field(None, ge=0.0, lt=1.0)  # end ratio for linear/cosine/step schedules
    schedule: Literal["constant", "linear", "cosine", "step"] = "constant"
    hard_share_start: float = Field(0.0, ge=0.0, le=1.0)  # hard-patch: share chosen by predicted loss
    hard_share_end: float = Field(0.5, ge=0.0, le=1.0)


class PretrainConfig(_Section):
    model: str = "mae_vit_tiny_patch4"  # see pipeline/mae.py for sizes
    image_size: int | None = None  # None: decode.image_size
    decoder_dim: int | None = None  # None: the size's default
    decoder_depth: int | None = None
    norm_pix_loss: bool = True
    mask: MaskConfig = Field(default_factory=MaskConfig)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, gt=0)  # per worker
    base_lr: float = Field(1.5e-4, gt=0.0)  # lr = base_lr * global_batch / 256
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.05, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0.0)  # None: sized from the cluster and data_cpu_share
    checkpoint_every: int = Field(100, ge=1)
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(10, ge=1)
    augment: bool = True  # random resized crop + flip
    seed: int = 0
    warm_start: str | None = None  # encoder.pth or checkpoint dir to start from


class EvaluateConfig(_Section):
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0.0)
    probe_epochs: int = Field(30, ge=1)
    probe_lr: float = Field(0.1, gt=0.0)
    holdout: float = Field(0.3, gt=0.0, lt=1.0)  # share of the labeled data used as the test split
    seed: int = 0


class TuneConfig(_Section):
    num_samples: int = Field(6, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"
    grace_period: int = Field(1, ge=1)  # ASHA: evaluation intervals before a trial may be stopped
    reduction_factor: int = Field(2, ge=2)
    eval_every: int = Field(20, ge=1)  # steps between reports to Tune
    cpus_per_trial: float = Field(0.5, gt=0.0)
    space: dict[str, Any] = Field(default_factory=dict)  # see tuning/space.py
    output: str | None = None  # None: <output>/sweeps


class ScheduleConfig(_Section):
    concurrency: Literal["skip", "queue", "replace"] = "skip"
    catch_up: Literal["once", "all", "none"] = "once"
    state: str | None = None  # state store URL; None: ~/.maskdiet/schedules.json


class Config(_Section):
    """The whole pipeline's configuration. Every key has a default; see defaults.yaml for comments."""

    output: str = "maskdiet-output"  # fsspec URL of the output root
    run_id: str | None = None  # None: generated
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _check_schedule_ends(self) -> Config:
        mask = self.pretrain.mask
        if mask.schedule != "constant" and mask.ratio_end is None:
            raise ValueError(
                f"pretrain.mask.schedule={mask.schedule!r} needs pretrain.mask.ratio_end (the final ratio)"
            )
        return self

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with secrets removed: safe for logs, manifests and reports."""
        data = self.model_dump(mode="json")
        if data["data"]["storage_options"]:
            data["data"]["storage_options"] = dict.fromkeys(data["data"]["storage_options"], "***")
        return data


# ---------------------------------------------------------------------------------------------- loading


def default_dict() -> dict[str, Any]:
    """The embedded defaults as a plain dict."""
    text = importlib.resources.files("pipeline").joinpath("defaults.yaml").read_text()
    return yaml.safe_load(text) or {}


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, bools, lists, null), else keep the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a nested dict in place; the key must exist in the schema."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"unknown config key {key!r}: {part!r} is not a key of {where} "
                f"(expected one of: {', '.join(sorted(fields))})"
            )
        if i == len(parts) - 1:
            break
        annotation = fields[part].annotation
        if typing.get_origin(annotation) is dict:
            break  # a free-form mapping (storage_options, tune.space): any sub-key goes
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"config key {'.'.join(parts[: i + 1])!r} is a value, not a section")
        model = annotation
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is not a section")
    target[parts[-1]] = _parse_value(raw)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("storage_options",):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r}")
        else:
            lines.append(f"bad value for {key!r}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (local path or fsspec URL) into a dict; a clear error if missing or bad."""
    import fsspec

    try:
        with fsspec.open(str(path), "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults ← `base` ← the YAML file at `path` ← `--set` overrides, validated into a `Config`."""
    data = default_dict()
    if base:
        data = _merge(data, base)
    if path is not None:
        data = _merge(data, read_yaml(path))
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML (secrets redacted), loadable again by `load_config`."""
    return yaml.safe_dump(config.redacted(), sort_keys=False)
