"""Ray Tune sweeps over the pretraining loop: one trial = one `maskdiet pretrain` run with a trial's config.

    maskdiet sweep examples/sweep.yaml                  # new sweep under <output>/sweeps/sweep-<time>/
    maskdiet sweep examples/sweep.yaml --resume         # continue the latest (or --name) sweep

A sweep directory holds

    sweep.yaml                the config the sweep started with (tune.manifest filled in); --resume reads it
    curate/                   the one scored manifest, when tune.manifest was not given
    trials/<trial_id>/        each trial's pretrain output: manifest.parquet (when pruning is swept),
                              checkpoints/, encoder.pth, metrics.jsonl, attempts/ (one object per start)
    results.parquet           one row per trial, sorted by the objective (best first)
    best.yaml                 the best trial's whole config: `maskdiet run/pretrain --config best.yaml` as is
    objective_vs_mask_ratio.png

and Tune's own experiment state (`Tuner.restore` reads it). Trials are Ray 2.60 function trainables that
build the same `TorchTrainer` as `maskdiet pretrain` (`pipeline.train.build_trainer`) with Tune's
`TuneReportCallback`, so each `ray.train.report` of the loop (every eval interval: `step`, `loss`,
`val_loss`, ...) reaches Tune's scheduler. ASHA stops trials that trail at a rung, measured in training
steps. Curation axes (policy, keep fraction) re-prune the one scored manifest with `stages.prune.prune`
inside each trial; nothing is ever rescored.

Resources: the trial's function takes no CPU (it only waits on its Train controller); its Train workers take
`tune.cpus_per_trial` (and `gpus_per_trial`) between them, and `max_concurrent_trials` defaults to as many
trials as the cluster's CPUs fit after the `ray.data_cpu_share` left to Ray Data.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import Config, ConfigError, dump_config, flatten_dotted, get_dotted, load_config
from pipeline.core.storage import absolute_url, atomic_write_bytes, exists, join, ray_storage, url_to_fs
from tuning.space import STANDARD_COLUMNS, SearchSpace, build_search_space, trial_config

log = logging.getLogger(__name__)

SWEEP_CONFIG = "sweep.yaml"
RESULTS = "results.parquet"
BEST = "best.yaml"
PLOT = "objective_vs_mask_ratio.png"
SCORE_FREE_POLICIES = ("random", "none")  # policies that need no score column
# The trial's own function only waits on its Train run: it asks for no CPU (a CPU share, however small,
# would leave Ray Data less than the whole CPU its read tasks need: seen here as a deadlock with 2 trials on
# 2 CPUs). Tune refuses an empty request, so it asks for a token amount of memory instead.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1024 * 1024}


@dataclass
class SweepResult:
    """What a finished (or resumed) sweep produced; `table` is sorted by the objective, best first."""

    sweep_dir: str
    table: pd.DataFrame
    best_config: Config | None
    results_url: str
    best_config_url: str | None
    plot_url: str | None
    metric: str
    mode: str
    seconds: float

    @property
    def stopped_early(self) -> int:
        return int(self.table["stopped_early"].sum()) if len(self.table) else 0

    @property
    def unfinished(self) -> int:
        """Trials an interruption left pending or running: `--resume` runs them."""
        return int((self.table["status"] == "unfinished").sum()) if len(self.table) else 0


# ---------------------------------------------------------------------------------------------- trials


def trial_output(sweep_dir: str, trial_id: str) -> str:
    return join(sweep_dir, "trials", trial_id)


def _record_attempt(output: str, trial_id: str, params: dict[str, Any], so: dict[str, Any]) -> None:
    """One small object per start of a trial, so a resume that reran a finished trial would show."""
    body = json.dumps({"trial_id": trial_id, "time": time.time(), "params": params}, default=str)
    name = f"{time.time_ns()}-{uuid.uuid4().hex[:6]}.json"
    atomic_write_bytes(join(output, "attempts", name), body.encode(), so)


def count_attempts(sweep_dir: str, trial_id: str, storage_options: dict[str, Any] | None = None) -> int:
    """How many times a trial's function started (1 for a trial that ran once, across resumes)."""
    fs, path = url_to_fs(join(trial_output(sweep_dir, trial_id), "attempts"), storage_options)
    return len(fs.ls(path)) if fs.exists(path) else 0


def trial_manifest(config: Config, manifest_url: str, output: str, prunes: bool) -> str:
    """The manifest a trial trains on: the scored manifest as is, or re-pruned per the trial's `prune`."""
    if not prunes:
        return manifest_url
    from stages.manifest import MANIFEST_NAME, read_table, write_manifest
    from stages.prune import prune

    so = config.data.storage_options
    frame, metadata = read_table(manifest_url, so)
    pruned = prune(frame.drop(columns=["kept", "reason"]), config.prune)
    url = join(output, MANIFEST_NAME)
    metadata = {**metadata, "config": config.redacted(), "scored_manifest": manifest_url}
    write_manifest(url, pruned, metadata, so)
    log.info(
        "trial manifest: kept %d of %d (%s)", int(pruned["kept"].sum()), len(pruned), config.prune.policy
    )
    return url


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    manifest_url: str,
    sweep_dir: str,
    prunes: bool,
) -> None:
    """Tune's function trainable: one pretraining run with `params` applied to `base`.

    Reports reach Tune through `TuneReportCallback`; when Tune restores an unfinished trial, the same Train
    run name and storage path make Ray Train resume from that trial's latest checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.core.runtime import configure_data_context
    from pipeline.train import build_trainer

    configure_data_context()  # this actor drives its own Ray Data pipeline: our progress and retry settings
    config = trial_config(base, params)
    if "pretrain.num_workers" in params:
        config = split_trial_share(config, params)
    trial_id = tune.get_context().get_trial_id()
    output = trial_output(sweep_dir, trial_id)
    _record_attempt(output, trial_id, params, config.data.storage_options)
    manifest = trial_manifest(config, manifest_url, output, prunes)
    trainer = build_trainer(config, manifest, output, run_name="pretrain", callbacks=[TuneReportCallback()])
    trainer.fit()


# ---------------------------------------------------------------------------------------------- setup


def sweep_config(config: Config) -> Config:
    """The base config every trial starts from: Train workers sized to the trial's share, and the
    report interval set from `tune.eval_every`."""
    tune = config.tune
    updates: dict[str, Any] = share_per_worker(config, config.pretrain.num_workers)
    if tune.gpus_per_trial > 0:
        updates["use_gpu"] = True
    if tune.eval_every is not None:
        updates["eval_every"] = tune.eval_every
    pretrain = config.pretrain.model_copy(update=updates)
    return config.model_copy(update={"pretrain": pretrain})


def share_per_worker(config: Config, workers: int) -> dict[str, float]:
    """A trial's CPUs (and GPUs) split over its `workers`. Ray takes a GPU count below 1 or a whole one."""
    tune = config.tune
    share = {"cpus_per_worker": tune.cpus_per_trial / workers}
    if tune.gpus_per_trial > 0:
        gpus = tune.gpus_per_trial / workers
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(
                f"tune.gpus_per_trial={tune.gpus_per_trial} over {workers} workers is {gpus:g} GPUs each; "
                "Ray takes a fraction below 1 or a whole number"
            )
        share["gpus_per_worker"] = gpus
    return share


def split_trial_share(config: Config, params: dict[str, Any]) -> Config:
    """A trial with its own `num_workers`: the trial's share split over them (unless swept directly)."""
    share = share_per_worker(config, config.pretrain.num_workers)
    share = {k: v for k, v in share.items() if f"pretrain.{k}" not in params}
    return config.model_copy(update={"pretrain": config.pretrain.model_copy(update=share)})


def max_concurrent(config: Config, cluster_cpus: float, cluster_gpus: float) -> int:
    """Trials that fit at once: the CPUs left after Ray Data's share, divided by each trial's CPUs."""
    if config.tune.max_concurrent_trials is not None:
        return config.tune.max_concurrent_trials
    train_cpus = cluster_cpus * (1.0 - config.ray.data_cpu_share)
    fit = math.floor(train_cpus / config.tune.cpus_per_trial + 1e-9)
    if config.tune.gpus_per_trial > 0:
        fit = min(fit, math.floor(cluster_gpus / config.tune.gpus_per_trial + 1e-9))
    return max(1, fit)


def sweep_root(config: Config) -> str:
    """The folder every sweep of `config` goes under (absolute: Tune runs each trial in its own folder)."""
    return absolute_url(config.tune.output or join(config.output, "sweeps"))


def latest_sweep(root: str, storage_options: dict[str, Any]) -> str | None:
    """The most recently started sweep folder under `root` (by when its sweep config was written), or None.

    Names do not order sweeps: `sweep-<time>` is only the default, and a job's sweep is named after its
    submission id."""
    fs, path = url_to_fs(root, storage_options)
    if not fs.exists(path):
        return None
    started = []
    for entry in fs.ls(path, detail=False):
        config_path = f"{entry.rstrip('/')}/{SWEEP_CONFIG}"
        if fs.exists(config_path):
            started.append((_written_at(fs, config_path), entry.rstrip("/").rsplit("/", 1)[-1]))
    return max(started)[1] if started else None


def _written_at(fs: Any, path: str) -> float:
    """POSIX time `path` was last written; 0 where the filesystem cannot say (then names break the tie)."""
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, OSError, KeyError, AttributeError):
        return 0.0


def _check_manifest_scores(config: Config, space: SearchSpace, manifest_url: str) -> None:
    """A swept score-based policy needs scores: fail before the trials when the manifest has none."""
    if not space.prunes:
        return
    from stages.manifest import read_manifest

    frame = read_manifest(manifest_url, config.data.storage_options)
    policies = {config.prune.policy}
    for axis in space.axes:
        if axis.key == "prune.policy":
            policies |= set(axis.corners())
        elif axis.key == "prune" and axis.kind != "uniform":
            policies |= {v.get("policy", config.prune.policy) for v in axis.corners()}
    needs_score = sorted(p for p in policies if p not in SCORE_FREE_POLICIES)
    if needs_score and frame["score"].isna().all():
        raise ConfigError(
            f"tune.space prunes with {needs_score}, but the manifest {manifest_url} has no scores: "
            f"curate with score.method set (not 'none'), or sweep prune.policy over {list(SCORE_FREE_POLICIES)}"
        )


def _prepare_manifest(config: Config, sweep_dir: str, progress: Any) -> str:
    if config.tune.manifest:
        return absolute_url(config.tune.manifest)
    if not config.data.input:
        raise ConfigError("a sweep needs a scored manifest: set tune.manifest or data.input to curate once")
    from pipeline.curate import curate

    log.info("curating %s once for the sweep", config.data.input)
    return curate(config, progress=progress, run_dir=join(sweep_dir, "curate")).manifest_url


# ---------------------------------------------------------------------------------------------- driver


def ignored_on_resume(given: Config, saved: Config) -> list[str]:
    """Settings given now (away from the defaults) that a resumed sweep does not use: it runs on with the
    config it started with. What does come from now is left out: `data.*` (it carries credentials),
    `ray.*` (where to run), and `tune.name`, `tune.output` and `output` (which sweep, and where)."""
    now, then, default = (
        flatten_dotted(given.model_dump()),
        flatten_dotted(saved.model_dump()),
        flatten_dotted(load_config().model_dump()),
    )
    return [
        f"{key}={now[key]!r}"
        for key in sorted(now)
        if now[key] != then.get(key)
        and now[key] != default.get(key)
        and not key.startswith(("data.", "ray.", "run_id"))
        and key not in ("tune.name", "tune.output", "output")
    ]


@dataclass(frozen=True)
class _Sweep:
    """A sweep about to run: its config (as sweep.yaml holds it), name, folder and search space."""

    config: Config
    name: str
    sweep_dir: str
    space: SearchSpace


def run_sweep(
    config: Config,
    *,
    resume: bool = False,
    num_samples: int | None = None,
    progress: Any = None,
    verbose: int = 0,
) -> SweepResult:
    """Run (or with `resume`, continue) a sweep per `config.tune`; Ray must be up (`ray_session`).

    The search space is validated before anything else runs. A new sweep curates once (unless
    `tune.manifest` names a scored manifest), then runs the trials; results land in the sweep directory.
    """
    start = time.perf_counter()
    root = sweep_root(config)
    if resume:
        sweep = _reopen_sweep(config, root, num_samples)
    else:
        sweep = _start_sweep(config, root, num_samples, progress)
    _check_inputs(sweep)
    base = sweep_config(sweep.config)
    _check_worker_shares(sweep)
    storage_path, storage_fs = ray_storage(root, config.data.storage_options)
    # Tune's experiment folder: in an object store, the path inside the store that storage_fs reads
    experiment = join(storage_path, sweep.name) if storage_fs is not None else join(root, sweep.name)
    tuner = _tuner(sweep, base, resume, experiment, storage_path, storage_fs, verbose)
    grid = tuner.fit()
    tc = sweep.config.tune
    saved = saved_trials(experiment, storage_fs)
    table = results_table(grid, base, sweep.space, tc.metric, tc.mode, sweep.sweep_dir, saved)
    return write_results(table, sweep.config, sweep.sweep_dir, time.perf_counter() - start)


def _start_sweep(config: Config, root: str, num_samples: int | None, progress: Any) -> _Sweep:
    """A new sweep under `root`: the search space checked first, then the name claimed (an existing sweep of
    that name is refused), the scored manifest found or curated once, and sweep.yaml written."""
    so = config.data.storage_options
    if num_samples is not None:
        config = config.model_copy(
            update={"tune": config.tune.model_copy(update={"num_samples": num_samples})}
        )
    space = build_search_space(config)  # before any curation or trial
    name = config.tune.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    sweep_dir = join(root, name)
    if exists(join(sweep_dir, SWEEP_CONFIG), so):
        raise ConfigError(
            f"a sweep already exists at {sweep_dir}: pass --resume, or choose another tune.name"
        )
    manifest_url = _prepare_manifest(config, sweep_dir, progress)
    config = config.model_copy(
        update={"tune": config.tune.model_copy(update={"manifest": manifest_url, "name": name})}
    )
    atomic_write_bytes(join(sweep_dir, SWEEP_CONFIG), dump_config(config).encode(), so)
    return _Sweep(config=config, name=name, sweep_dir=sweep_dir, space=space)


def _reopen_sweep(given: Config, root: str, num_samples: int | None) -> _Sweep:
    """The sweep to resume: `tune.name`, else the one started last under `root`. It runs on with the config
    it started with (its sweep.yaml), with the storage options given now (secrets are never written); what
    else was given now and goes unused is named in a warning."""
    so = given.data.storage_options
    name = given.tune.name or latest_sweep(root, so)
    if name is None:
        raise ConfigError(f"nothing to resume: no sweep under {root} (set tune.name to pick one)")
    sweep_dir = join(root, name)
    saved = join(sweep_dir, SWEEP_CONFIG)
    if not exists(saved, so):
        raise ConfigError(f"nothing to resume at {sweep_dir}: {SWEEP_CONFIG} is missing")
    config = load_config(saved, base=None, overrides=()).model_copy(update={"data": given.data})
    ignored = ignored_on_resume(given, config)
    if num_samples is not None and num_samples != config.tune.num_samples:
        ignored.insert(0, f"--num-samples {num_samples} (the sweep has {config.tune.num_samples})")
    if ignored:
        log.warning("resuming %s with its saved config; ignored: %s", name, ", ".join(ignored))
    return _Sweep(config=config, name=name, sweep_dir=sweep_dir, space=build_search_space(config))


def _check_inputs(sweep: _Sweep) -> None:
    """What every trial would fail on, checked once before any starts: the manifest has the scores a swept
    policy needs, and `tune.metric=val_loss` has held-out images to measure."""
    config = sweep.config
    assert config.tune.manifest is not None
    _check_manifest_scores(config, sweep.space, config.tune.manifest)
    if config.tune.metric == "val_loss" and config.pretrain.val_images == 0:
        raise ConfigError("tune.metric=val_loss needs held-out images: set pretrain.val_images > 0")


def _check_worker_shares(sweep: _Sweep) -> None:
    """A swept worker count splits each trial's share its own way: check each value's split before any
    trial (`share_per_worker` refuses a GPU share Ray cannot place)."""
    for axis in sweep.space.axes:
        if axis.key == "pretrain.num_workers":
            for workers in axis.corners():
                share_per_worker(sweep.config, int(workers))


def _tuner(
    sweep: _Sweep,
    base: Config,
    resume: bool,
    experiment: str,
    storage_path: str,
    storage_fs: Any,
    verbose: int,
) -> Any:
    """Tune's `Tuner` over `run_trial`: restored from `experiment` to resume, else a new one with the
    sweep's space, scheduler, searcher and as many trials at once as the cluster fits."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline.core.runtime import cluster_cpus, cluster_gpus

    config, space, tc = sweep.config, sweep.space, sweep.config.tune
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base.model_dump(),
            manifest_url=tc.manifest,
            sweep_dir=sweep.sweep_dir,
            prunes=space.prunes,
        ),
        TRIAL_DRIVER_RESOURCES,
    )
    concurrent = max_concurrent(config, cluster_cpus(), cluster_gpus())
    log.info(
        "sweep %s: %d sample(s) x %d grid point(s), %d at once, %s scheduler, %s search",
        sweep.sweep_dir,
        tc.num_samples,
        space.grid_size(),
        concurrent,
        tc.scheduler,
        tc.search,
    )
    if resume:
        return tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=storage_fs)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(grid_ok=tc.search != "optuna"),
        tune_config=tune.TuneConfig(
            num_samples=tc.num_samples,
            max_concurrent_trials=concurrent,
            scheduler=_scheduler(base, space, ASHAScheduler, FIFOScheduler),
            search_alg=_searcher(config, space),
            metric=tc.metric,
            mode=tc.mode,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=verbose,
            callbacks=_tracking_callbacks(config, base, sweep),
        ),
    )


def _tracking_callbacks(config: Config, base: Config, sweep: _Sweep) -> list[Any]:
    """One tracked run per trial when `tracking` names MLflow or TensorBoard (MLflow's install checked
    here, before any trial starts)."""
    tracking = config.tracking
    if not (tracking.mlflow_uri or tracking.tensorboard_dir):
        return []
    from pipeline.tracking import mlflow_client
    from tuning.tracking import TrackTrials

    if tracking.mlflow_uri:
        mlflow_client(tracking.mlflow_uri)
    return [TrackTrials(config, base.model_dump(), sweep.sweep_dir, sweep.name)]


def _scheduler(config: Config, space: SearchSpace, asha: Any, fifo: Any) -> Any:
    """ASHA measured in training steps (robust to a resumed trial re-reporting an interval), up to the
    longest trial's steps when `pretrain.steps` is swept."""
    if config.tune.scheduler == "fifo":
        return fifo()
    every = config.pretrain.eval_every
    swept = [a for a in space.axes if a.key == "pretrain.steps"]
    max_t = int(max(swept[0].corners())) if swept else config.pretrain.steps
    grace = min(config.tune.grace_period * every, max_t)
    return asha(
        time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=config.tune.reduction_factor
    )


def _searcher(config: Config, space: SearchSpace) -> Any:
    if config.tune.search == "random":
        return None
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("tune.search=optuna needs Optuna: pip install 'maskdiet[tune]'") from None
    if any(a.is_section for a in space.axes):
        raise ConfigError(
            "tune.search=optuna takes value axes only; split section axes (pretrain.mask) into keys"
        )
    if space.has_grid():
        log.warning("Optuna cannot expand a grid: grid axes are sampled as choices")
    return OptunaSearch()


# ---------------------------------------------------------------------------------------------- results


def _status(
    tune_status: str | None, error: Any, steps: int, trial_steps: int, stopped: str | None = None
) -> str:
    """finished | stopped (early, by the scheduler) | diverged (non-finite loss: `stopped` holds the
    message) | error | unfinished (interrupted; --resume runs it). `trial_steps`: the trial's own
    pretrain.steps."""
    if error or tune_status == "ERROR":
        return "error"
    if tune_status not in (None, "TERMINATED"):
        return "unfinished"
    if stopped:
        return "diverged"
    return "stopped" if steps < trial_steps else "finished"


def saved_trials(experiment_path: str, storage_fs: Any) -> dict[str, tuple[str, str]]:
    """Trial path → (trial id, status) from the experiment state Tune saved last. After Ctrl-C, Tune
    stops the running trials in memory (they read TERMINATED) but saves them as still to run (PENDING)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment_path, storage_filesystem=storage_fs)
    return {str(t.path): (str(t.trial_id), str(t.status)) for t in analysis.trials}


def results_table(
    grid: Any,
    base: Config,
    space: SearchSpace,
    metric: str,
    mode: str,
    sweep_dir: str,
    saved: dict[str, tuple[str, str]],
) -> pd.DataFrame:
    """One row per trial: its status (from `saved_trials`), the objective (last reported value, what ASHA
    compares), the standard axes from the trial's resolved config, every swept key, and its output folder;
    best first."""
    base_data = base.model_dump()
    standard_keys = {key for _, key in STANDARD_COLUMNS}
    rows = []
    for i, result in enumerate(grid):
        params = {k: v for k, v in (result.config or {}).items() if k in space.keys}
        last = result.metrics or {}
        trial_id, tune_status = saved.get(str(result.path), (str(last.get("trial_id", i)), None))
        history = result.metrics_dataframe
        values = history[metric].dropna() if history is not None and metric in history else pd.Series([])
        steps = int(last.get("step", 0) or 0)
        try:
            cfg: Config | None = trial_config(base_data, params)
        except ConfigError:
            cfg = None
        trial_steps = cfg.pretrain.steps if cfg is not None else base.pretrain.steps
        status = _status(tune_status, result.error, steps, trial_steps, last.get("stopped"))
        row: dict[str, Any] = {
            "trial_id": trial_id,
            "status": status,
            # a diverged trial ranks last, whatever it reported before its loss blew up
            "objective": float(values.iloc[-1]) if len(values) and status != "diverged" else np.nan,
            "best_objective": float(values.min() if mode == "min" else values.max())
            if len(values)
            else np.nan,
            "reports": len(values),
            "step": steps,
            "images_per_s": float(last.get("images_per_s", np.nan) or np.nan),
        }
        row["stopped_early"] = row["status"] == "stopped"
        if cfg is not None:
            for column, key in STANDARD_COLUMNS:
                row[column] = get_dotted(cfg, key)
        for key, value in params.items():
            if key not in standard_keys:
                row[key] = json.dumps(value) if isinstance(value, dict) else value
        row["output"] = trial_output(sweep_dir, trial_id)
        row["error"] = (
            str(result.error).splitlines()[0][:200]
            if result.error
            else (str(last["stopped"])[:200] if status == "diverged" else None)
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values("objective", ascending=(mode == "min"), na_position="last", kind="stable")
    return table.reset_index(drop=True)


def best_trial_config(table: pd.DataFrame, base: Config, space: SearchSpace) -> Config | None:
    """The whole config of the best trial with a finite objective, with `tune.space` emptied: it is a
    single-run config for `maskdiet run`/`pretrain`."""
    finite = table[np.isfinite(table["objective"].astype(float))]
    if finite.empty:
        return None
    best = finite.iloc[0]
    params = {}
    for axis in space.axes:
        column = next((c for c, k in STANDARD_COLUMNS if k == axis.key), axis.key)
        value = best[column]
        if axis.is_section and isinstance(value, str):
            value = json.loads(value)
        params[axis.key] = value.item() if isinstance(value, np.generic) else value
    config = trial_config(base.model_dump(), params)
    return config.model_copy(update={"tune": config.tune.model_copy(update={"space": {}})})


def plot_objective(table: pd.DataFrame, metric: str) -> bytes:
    """PNG: the objective against the (start) mask ratio, one series per ratio schedule; trials that ASHA
    stopped early are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for schedule, group in table.groupby("schedule", sort=True):
        group = group.sort_values("mask_ratio")
        done = group[~group["stopped_early"]]
        line = ax.plot(done["mask_ratio"], done["objective"], "o-", label=str(schedule))[0]
        stopped = group[group["stopped_early"]]
        ax.scatter(
            stopped["mask_ratio"], stopped["objective"], facecolors="none", edgecolors=line.get_color()
        )
    ax.set_xlabel("mask ratio (start)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs mask ratio (hollow: stopped early by ASHA)")
    ax.legend(title="ratio schedule")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_results(table: pd.DataFrame, config: Config, sweep_dir: str, seconds: float) -> SweepResult:
    """Write results.parquet, best.yaml (from the sweep's own config, so resources stay the user's) and
    the plot into the sweep directory, each atomically."""
    so = config.data.storage_options
    metric, mode = config.tune.metric, config.tune.mode
    space = build_search_space(config)
    results_url = join(sweep_dir, RESULTS)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(results_url, buffer.getvalue(), so)
    complete = len(table) > 0 and not (table["status"] == "unfinished").any()
    best = best_trial_config(table, config, space) if complete else None  # none from an interrupted sweep
    best_url = plot_url = None
    if best is not None:
        best_url = join(sweep_dir, BEST)
        atomic_write_bytes(best_url, dump_config(best).encode(), so)
        plot_url = join(sweep_dir, PLOT)
        atomic_write_bytes(plot_url, plot_objective(table, metric), so)
    return SweepResult(
        sweep_dir=sweep_dir,
        table=table,
        best_config=best,
        results_url=results_url,
        best_config_url=best_url,
        plot_url=plot_url,
        metric=metric,
        mode=mode,
        seconds=seconds,
    )
