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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import UserInputError


class ConfigError(UserInputError):
    """A configuration problem, with a message that names the key and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": connect
    num_cpus: int | None = None  # local Ray only; None = all cores of this machine
    num_gpus: int | None = None  # local Ray only
    include_dashboard: bool = True  # Tune's early stopping frees Train resources through the State API
    data_cpu_share: float = Field(0.5, gt=0.0, lt=1.0)  # share of CPUs left to Ray Data beside Train workers
    # Ray Data settings for the cluster's size: "small" (a laptop or one small node: every CPU counts, so
    # Ray Data's per-operator CPU reservation is off), "large" (Ray's own defaults), or "auto": small when the
    # cluster has at most `small_cluster_cpus` CPUs and no GPU.
    data_profile: Literal["auto", "small", "large"] = "auto"
    small_cluster_cpus: int = Field(8, ge=1)
    # Ray Train's own console lines below this level (worker-group start, every report and checkpoint) go
    # only to its log files under the Ray session folder; INFO shows them all. Our logs are unaffected.
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    @property
    def state_api(self) -> bool:
        """Whether the cluster has Ray's State API (a dashboard): a local Ray only with `include_dashboard`;
        a cluster we connect to is assumed to run one."""
        return self.include_dashboard or self.address is not None


class DataConfig(_Section):
    # fsspec URL of the images: a folder <root>/<class>/<file>; a prefix, file or brace pattern of WebDataset
    # .tar shards (s3://b/train-{000000..000099}.tar); a Parquet table or a prefix of them (stages/formats.py)
    input: str = ""
    # How `input` stores images. auto: decided from what the URL holds (.tar shards or a brace pattern of
    # them → webdataset, .parquet tables and no image files → parquet, else folder).
    format: Literal["auto", "folder", "webdataset", "parquet"] = "auto"
    labels: str | None = None  # folders: optional table (csv/parquet) with columns path,label[,class_name]
    # Shards and tables: class names, label i being classes[i], and text labels looked up in them. None: the
    # sorted labels (integer labels 0..max named "0".."max"; text labels sorted, their index the label).
    # Folders name their classes by their folders.
    classes: list[str] | None = None
    label_field: str | None = None  # webdataset: the .json field holding the label; None: the .cls member
    image_column: str = "image"  # parquet: raw image bytes, or the Hugging Face {"bytes", "path"} struct
    label_column: str | None = "label"  # parquet: integer or class-name labels; None: unlabeled (-1)
    # A shard sample or table row without a label: a quarantine row (reason missing-label), or unlabeled
    # (label -1: enough for --score none|prototype and for pretraining).
    missing_label: Literal["quarantine", "unlabeled"] = "quarantine"
    storage_options: dict[str, Any] = Field(default_factory=dict)  # passed to fsspec; never logged
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"]
    )
    read_batch_size: int = Field(64, gt=0)  # rows per read / decode batch
    task_rows: int = Field(256, gt=0)  # rows per Ray Data read task (one block): amortises per-task cost


class DecodeConfig(_Section):
    image_size: int = Field(32, ge=8)  # output is RGB uint8 image_size x image_size
    resize: Literal["center-crop", "squash"] = "center-crop"  # shorter side to size, then center crop
    max_pixels: int = Field(89_478_485, gt=0)  # larger declared dimensions are quarantined as too-large
    max_bytes: int = Field(256 * 1024 * 1024, gt=0)  # larger objects are quarantined as too-large
    background: tuple[int, int, int] = (255, 255, 255)  # fill for transparent pixels


class ScoreConfig(_Section):
    method: Literal["el2n", "grand", "forgetting", "prototype", "none"] = "el2n"
    num_models: int = Field(5, ge=1)  # K proxy models from different seeds (the paper used ~10)
    epochs: int = Field(10, ge=1)  # brief training: about a tenth of a full run (the paper: 20 of 200)
    model: Literal["cnn-small", "resnet18"] = "cnn-small"
    batch_size: int = Field(64, gt=0)  # proxy training minibatch
    lr: float = Field(0.1, gt=0.0)  # SGD (momentum 0.9, Nesterov), constant: scores are taken mid-run
    weight_decay: float = Field(5e-4, ge=0.0)
    seed: int = 0
    num_clusters: int = Field(10, ge=1)  # prototype scoring: k-means prototypes
    duplicate_threshold: float = Field(0.98, gt=0.0, le=1.0)  # cosine similarity for near-duplicates
    cache: bool = True  # reuse scores keyed by (sha256, scoring-config hash)
    cache_url: str | None = None  # score cache root; None: <output>/score_cache
    grand: Literal["last-layer", "full"] = "last-layer"  # full = per-example grad over all weights (slow)
    augment: bool = True  # random ±2 px shifts while training proxies (never when scoring)
    encoder: str | None = None  # prototype: a maskdiet encoder.pth to embed with instead of a proxy
    cpus_per_model: float = Field(1.0, gt=0.0)  # CPUs per proxy-training Ray task (torch threads)
    # How each proxy trains. "tasks": a Ray task (quick to start; a proxy whose task dies is trained again
    # from scratch). "train": a Ray Train job that checkpoints after every epoch and, when its worker dies,
    # restarts it from there (up to max_failures times); a rerun over the same images resumes unfinished
    # proxies. Both read the pixels window by window from the object store (stages/proxy_jobs.py).
    trainer: Literal["tasks", "train"] = "tasks"
    max_failures: int = Field(2, ge=0)  # trainer=train: worker restarts per proxy
    # How scoring runs in Ray Data. "tasks": tasks of 1–8 batches on Ray's already-running workers, each
    # rebuilding the K small proxies once (milliseconds); "actors": an actor pool that loads them once per
    # actor but starts fresh processes every run (seconds: a process, torch's import, the models).
    compute: Literal["tasks", "actors"] = "tasks"
    actors: int | None = Field(None, ge=1)  # actor pool size (compute=actors); None: one per CPU (max 8)
    score_batch_size: int = Field(512, gt=0)  # rows per forward pass (an actor call; a task takes 1–8)
    # Where the proxies train and score: GPUs when use_gpu (bf16; the Ray cluster needs GPUs), each proxy
    # task and scoring task or actor taking gpus_per_model of one (0.25: four small proxies share a GPU).
    use_gpu: bool = False
    gpus_per_model: float = Field(1.0, gt=0.0, le=1.0)
    # The decoded pixels live in the object store as chunks of chunk_rows images, rows dealt into chunks by
    # a fixed permutation (never one array); a proxy reads window_chunks chunks at a time, visiting windows
    # in random order and shuffling rows within each, so its memory is a window's, whatever the images.
    chunk_rows: int = Field(512, gt=0)
    window_chunks: int = Field(8, ge=1)

    @property
    def gpu_share(self) -> float:
        """The GPU share of each proxy task and scorer: gpus_per_model with use_gpu, else 0."""
        return self.gpus_per_model if self.use_gpu else 0.0


class PruneConfig(_Section):
    policy: Literal["keep-hard", "offset", "keep-easy", "class-balanced", "stratified", "random", "none"] = (
        "offset"
    )
    keep: float = Field(0.7, gt=0.0, le=1.0)  # fraction kept (ignored when keep_count is set)
    keep_count: int | None = Field(None, gt=0)  # absolute number kept
    offset: float = Field(0.1, ge=0.0, lt=1.0)  # hardest fraction dropped first as likely label noise
    bins: int = Field(10, ge=1)  # stratified (CCS) score bins
    drop_duplicates: bool = True  # keep one image per near-duplicate group (score.duplicate_threshold)
    seed: int = 0


class MaskConfig(_Section):
    strategy: Literal["random", "block", "hard-patch"] = "random"
    ratio: float = Field(0.75, ge=0.0, lt=1.0)  # start ratio (and the only one for 'constant')
    ratio_end: float | None = Field(None, ge=0.0, lt=1.0)  # end ratio for linear/cosine/step schedules
    schedule: Literal["constant", "linear", "cosine", "step"] = "constant"
    hard_share_start: float = Field(0.0, ge=0.0, le=1.0)  # hard-patch: share chosen by predicted loss
    hard_share_end: float = Field(0.5, ge=0.0, le=1.0)
    step_at: float = Field(0.5, gt=0.0, lt=1.0)  # step schedule: share of training before ratio_end applies
    block_min_patches: int = Field(4, ge=1)  # block masking: smallest rectangle, in patches (BEiT: 16)
    loss_head_weight: float = Field(1.0, ge=0.0)  # hard-patch: weight of the loss predictor's ranking loss


class PretrainConfig(_Section):
    model: str = "mae_vit_mini_patch4"  # see pipeline/models/mae.py for sizes
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
    gpus_per_worker: float = Field(1.0, gt=0.0)  # with use_gpu; a fraction lets trials share a GPU
    cpus_per_worker: float | None = Field(None, gt=0.0)  # None: sized from the cluster and data_cpu_share
    threads: int | None = Field(None, ge=1)  # torch threads per worker; None: see train.torch_threads
    checkpoint_every: int = Field(100, ge=1)
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(10, ge=1)  # steps between metrics lines: losses stay on the device until then
    # torch.compile the model's step (forward and backward, one graph): "auto" compiles on GPU workers only
    # (on CPU the compile, ~30 s for the micro model on 2 cores, costs more than a short run wins back)
    compile: Literal["auto", "on", "off"] = "auto"
    augment: bool = True  # random resized crop + flip, on the training device in batch form
    seed: int = 0
    warm_start: str | None = None  # encoder.pth or checkpoint dir to start from
    eval_every: int = Field(20, ge=1)  # steps between val_loss evaluations and ray.train.report calls
    val_images: int = Field(64, ge=0)  # kept images held out (chosen by path hash) for val_loss; 0: none
    val_mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)  # fixed random mask (fixed seed) for val_loss
    crop_scale_min: float = Field(0.2, gt=0.0, le=1.0)  # random resized crop: smallest area share (MAE: 0.2)
    hflip: float = Field(0.5, ge=0.0, le=1.0)  # probability of a horizontal flip
    # Training images that fit this budget decoded (N × S × S × 3 bytes at the model's input side S) are read
    # and decoded once and kept in Ray's object store; 0: read and decode them from storage every epoch.
    cache_decoded_mib: int = Field(512, ge=0)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        """YAML reads a bare on/off/true/false as a bool: take it as "on"/"off"."""
        return ("on" if value else "off") if isinstance(value, bool) else value


class EvaluateConfig(_Section):
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0.0)
    probe_epochs: int = Field(30, ge=1)
    probe_lr: float = Field(0.1, gt=0.0)
    holdout: float = Field(0.3, gt=0.0, lt=1.0)  # share of the labeled data used as the test split
    pool: Literal["cls", "mean"] = "mean"  # encoder feature: CLS token or mean of the patch tokens
    batch_size: int = Field(256, gt=0)  # images per feature-extraction batch
    probe_batch_size: int = Field(256, gt=0)  # linear probe minibatch
    seed: int = 0
    # labeled images the probes learn from (and split, without test_data); None: data.input (`maskdiet run`)
    # or --data (`maskdiet evaluate`). A folder with demo truth (_truth.parquet) is read with its true labels
    data: str | None = None
    test_data: str | None = None  # separate labeled test folder (an official test split); None: holdout
    # end-to-end fine-tune of encoder + linear head; 0: off. 1 costs about one forward + backward pass per
    # image per encoder (~7 s each for the demo's 1,400 on 2 cores) and is far from converged: on the demo
    # 1 epoch gave 0.23, 2 gave 0.37, 5 gave 0.60 (probe 0.55); raise it to compare encoders by fine-tuning
    finetune_epochs: int = Field(1, ge=0)
    finetune_lr: float = Field(1e-3, gt=0.0)  # AdamW peak lr of the head (top layer), cosine after warmup
    finetune_layer_decay: float = Field(0.75, gt=0.0, le=1.0)  # MAE's layer-wise lr decay toward the input
    finetune_batch_size: int = Field(16, gt=0)  # small: more steps for the same compute in a short fine-tune
    # where features, kNN, the probe and the fine-tune run: auto = cuda when this process sees a GPU, else
    # cpu. A choice, not pretrain's use_gpu flag: evaluate runs in the calling process (the CLI or a Ray job's
    # entrypoint), which can look for a GPU itself, where a Train worker must ask Ray for one up front
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TuneConfig(_Section):
    num_samples: int = Field(6, ge=1)  # trials drawn (with grid axes: repeats of the whole grid)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster's Train CPUs fit
    # reported by the pretraining loop each eval interval (pipeline.train_loop.REPORTED_METRICS)
    metric: Literal["val_loss", "loss", "recon_loss", "images_per_s"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = "asha"  # asha: stop trials that trail at each rung
    search: Literal["random", "optuna"] = "random"  # optuna needs `pip install maskdiet[tune]`
    grace_period: int = Field(1, ge=1)  # ASHA: evaluation intervals before a trial may be stopped
    reduction_factor: int = Field(2, ge=2)  # ASHA: keep 1/reduction_factor of the trials at each rung
    eval_every: int | None = Field(None, ge=1)  # steps between reports to Tune; None: pretrain.eval_every
    cpus_per_trial: float = Field(0.5, gt=0.0)  # CPUs of each trial's Train workers (split over num_workers)
    gpus_per_trial: float = Field(0.0, ge=0.0)  # GPUs of each trial's Train workers (>0 sets use_gpu)
    space: dict[str, Any] = Field(default_factory=dict)  # axes to sweep; format in tuning/space.py
    manifest: str | None = None  # scored manifest every trial prunes from; None: curate data.input once
    name: str | None = None  # sweep name (folder under output); None: sweep-<timestamp>
    output: str | None = None  # None: <output>/sweeps


class ScheduleConfig(_Section):
    # previous run still active at the next slot: skip it (recorded `skipped`), queue it, or replace the old
    concurrency: Literal["skip", "queue", "replace"] = "skip"
    # several slots missed (scheduler down): run the latest once, each of them, or none (see misfire_grace_s)
    catch_up: Literal["once", "all", "none"] = "once"
    state: str | None = None  # state store URL (JSON object); None: ~/.maskdiet/schedules.json
    misfire_grace_s: int = Field(300, ge=0)  # catch_up=none: a slot later than this is recorded as missed


class ExportConfig(_Section):
    """`curate --export`: the kept images, as the original bytes, in shards other loaders read."""

    format: Literal["none", "webdataset", "parquet"] = "none"
    # Target size of one shard (a .tar or a .parquet file): images per shard are set from the mean size of
    # a sample of the kept images, so that shards come out near this size.
    shard_mib: float = Field(256.0, gt=0.0)
    # Images per shard, overriding shard_mib (e.g. 100 for many small shards in a test).
    samples_per_shard: int | None = Field(None, ge=1)
    prefix: str = "kept"  # shard names: <prefix>-000000.tar, <prefix>-000001.tar, ...


class TrackingConfig(_Section):
    """Where runs are logged besides metrics.jsonl. Both off by default; both may be on."""

    # An MLflow tracking URI: file:///path (offline, a folder), sqlite:///mlflow.db, http://host:5000.
    # Needs `pip install "maskdiet[mlflow]"`.
    mlflow_uri: str | None = None
    tensorboard_dir: str | None = (
        None  # a folder (local or fsspec URL) of TensorBoard event files, one per run
    )
    experiment: str = "maskdiet"  # the MLflow experiment runs and sweep trials are logged under


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
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

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


# ---------------------------------------------------------------------------------------------- dotted keys
# A dotted key (`pretrain.mask.ratio`) names one setting, as `--set` and `tune.space` write it. These are the
# one place that walks one: through data (nested dicts, or a Config and its sections) and through the schema.

_REQUIRED = object()


def _parts(key: str) -> list[str]:
    """The names in a dotted key; none for "" (the whole config)."""
    return key.split(".") if key else []


def get_dotted(data: Any, key: str, default: Any = _REQUIRED) -> Any:
    """The value at dotted `key` in nested dicts or a pydantic model (`""`: `data` itself).

    A missing part raises KeyError naming the key, unless a `default` is given: then that is returned."""
    node = data
    for part in _parts(key):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, BaseModel) and part in type(node).model_fields:
            node = getattr(node, part)
        elif default is _REQUIRED:
            raise KeyError(key)
        else:
            return default
    return node


def set_dotted(data: dict[str, Any], key: str, value: Any, *, merge: bool = False) -> None:
    """Set dotted `key` in nested dicts in place, creating missing sections; `value` is copied.

    A mapping set on a section replaces it (as `--set pretrain.mask={...}` does), or with `merge` is merged
    into it, the section's other keys kept (as a `tune.space` axis over a section means)."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is not a section")
    if merge and isinstance(value, dict) and isinstance(node.get(leaf), dict):
        value = {**node[leaf], **value}
    node[leaf] = copy.deepcopy(value)


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"a.b": 1, "a.c": 2}` → `{"a": {"b": 1, "c": 2}}`: dotted settings as a config's nested data."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        set_dotted(nested, key, value)
    return nested


def flatten_dotted(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `nest_dotted`: each value that is not a mapping under its dotted key (an empty mapping,
    holding none, leaves no key)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in flatten_dotted(value).items()})
        else:
            flat[key] = value
    return flat


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section model a field's annotation names, or None for a value."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def section_model(key: str) -> type[BaseModel] | None:
    """The section (a model class) that dotted `key` names in `Config`'s schema (`""`: `Config` itself), or
    None when it names a value. The key must exist: `check_key` says what is wrong with one that may not."""
    model: type[BaseModel] | None = Config
    for part in _parts(key):
        assert model is not None, f"{key!r} goes on past a value"
        model = _section_of(model.model_fields[part].annotation)
    return model


def check_key(key: str, what: str = "config key") -> None:
    """Raise ConfigError unless dotted `key` names a setting of `Config`. The message names the first part
    that is not a key of its section (and the keys that are), or that goes on past a value; `what` is how
    it calls the key. Under a free-form mapping (`data.storage_options`, `tune.space`) any sub-key goes."""
    parts = key.split(".")
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"unknown {what} {key!r}: {part!r} is not a key of {where} "
                f"(expected one of: {', '.join(sorted(fields))})"
            )
        annotation = fields[part].annotation
        if i == len(parts) - 1 or typing.get_origin(annotation) is dict:
            return
        section = _section_of(annotation)
        if section is None:
            raise ConfigError(f"{what} {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
        model = section


# ---------------------------------------------------------------------------------------------- loading


def default_dict() -> dict[str, Any]:
    """The embedded defaults as a plain dict."""
    text = importlib.resources.files("pipeline.core").joinpath("defaults.yaml").read_text()
    return yaml.safe_load(text) or {}


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, bools, lists, null), else keep the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def override_key(assignment: str) -> str:
    """The dotted key of a `--set dotted.key=value` assignment."""
    return assignment.partition("=")[0].strip()


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a nested dict in place; the key must exist in the schema."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    key, raw = override_key(assignment), assignment.partition("=")[2]
    check_key(key)
    set_dotted(data, key, _parse_value(raw))


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
            continue
        # echo the bad value only when it is a plain value outside storage_options: a whole section (as
        # model validators get) or a storage_options entry may hold credentials, which are never printed
        value = e.get("input")
        secret = "storage_options" in (str(p) for p in e["loc"])
        shown = "" if secret or isinstance(value, dict | list) else f" (got {value!r:.80})"
        lines.append(f"bad value for {key!r}: {e['msg']}{shown}")
    return "; ".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (local path or fsspec URL) into a dict; a clear error if missing or bad."""
    from pipeline.core.storage import StorageError, url_to_fs

    try:
        fs, inner = url_to_fs(str(path))
        with fs.open(inner, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except StorageError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


# Keys holding URLs; plain relative paths among them are made absolute when the config is loaded, because
# Ray's worker processes run in other folders than the driver.
PATH_KEYS = (
    "output",
    "data.input",
    "data.labels",
    "score.cache_url",
    "score.encoder",
    "pretrain.warm_start",
    "tune.manifest",
    "tune.output",
)


def _absolute_paths(data: dict[str, Any]) -> None:
    from pipeline.core.storage import absolute_url  # here, as in read_yaml: a config loads without pyarrow

    for key in PATH_KEYS:
        value = get_dotted(data, key, default=None)
        if isinstance(value, str) and value:
            set_dotted(data, key, absolute_url(value))


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> Config:
    """Defaults ← `base` ← the YAML file at `path` ← `flags` (a command's own options) ← `--set`
    overrides, validated into a `Config`."""
    data = default_dict()
    if base:
        data = _merge(data, base)
    if path is not None:
        data = _merge(data, read_yaml(path))
    if flags:
        data = _merge(data, flags)
    for assignment in overrides:
        apply_override(data, assignment)
    _absolute_paths(data)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML (secrets redacted), loadable again by `load_config`."""
    return yaml.safe_dump(config.redacted(), sort_keys=False)
