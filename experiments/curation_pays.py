"""Does curation pay for masked pretraining? Pruned vs random vs full data at a fixed budget (issue 21).

    python experiments/curation_pays.py --data URL --test URL --noise 0.2 --keep 0.6,0.4 --seeds 3 \
        --output experiments/results [--quick] [--steps N] [--policies full,offset,random] [--set key=value]

1. `--noise` of the training folder's labels are flipped to another class, reproducibly (`--noise-seed`),
   into a labels table `DIR/noisy_labels.parquet` (path, label, class_name, true_class, noisy): the input
   folder is never modified. The true labels are the folder names, or its demo truth (`_truth.parquet`).
2. The folder is scored once with EL2N on the noisy labels (`DIR/curate-el2n/`), and once with the label-free
   prototype score when the `prototype` arm is asked for (a second curation: its own proxies and k-means).
3. Each arm re-prunes a scored manifest with `stages.prune.prune` (as a sweep trial does), never rescoring:
   `full` (every image), `offset` (EL2N, dropping the hardest `--offset` first, default = `--noise`) and
   `random` at each keep, `keep-easy` and `stratified` (CCS) at the first keep, `prototype` (keep-hard on
   the prototype distance) at the first keep.
4. Every arm pretrains the same model for the same steps and batch (`RECIPE`, then `--set`), once per
   seed (`pretrain.seed` and the random policy's seed), keeping a checkpoint at each quarter of the
   budget (`--quick`: each half), and is evaluated on the clean `--test` folder (kNN, linear probe,
   fine-tune), the probes learning from the training folder's true labels, never the flipped ones. The
   raw-pixel and random-init baselines are measured once, on the same decoded split.
5. Compute to reach: each arm's checkpoints are probed, and `steps_to_full` is the first checkpoint step
   whose linear probe reaches the full-data arm's final mean (None: not within the budget).
6. The supervised Data Diet anchor: the proxy architecture (`score.model`) trained `--anchor-epochs` on each
   arm's kept images with the labels curation saw, tested on the clean test folder: do the scores keep
   the examples a classifier learns from?

Writes `DIR/curation_pays.json` ({"arms": [...], "baselines": {"pixels", "random_init"}, "settings"}),
`DIR/curation_pays.md` (mean ± std per arm) and `DIR/curation_pays.png` (accuracy vs keep, per policy).
One Ray session serves the whole script.

`--quick` is a check that every step runs (one seed, 100 steps, no fine-tune: about 12 minutes on 2 cores
for 3,000 training images); its encoders are too short-trained to say whether curation pays.

A full run takes hours on a laptop, so it resumes: rerun the same command and every finished step is
reused (the scored manifests, and each arm and seed's `DIR/arms/<arm>-s<seed>/record.json`); an arm that
was cut off starts again from scratch. `DIR/run.json` holds the settings the results depend on, and a
rerun with other settings into the same DIR stops with an error instead of mixing them. Arms run seed by
seed (every arm's seed 0 first), so a run stopped early still covers every arm. The fine-tune's settings
(`evaluate.finetune_*`) are the exception: each record keeps the recipe its fine-tune was measured with,
and a rerun with another recipe fine-tunes every finished arm's saved `encoder.pth` again (no
pretraining), so a run made with `evaluate.finetune_epochs=0` can add the fine-tune later.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("curation_pays")

POLICIES = ("full", "offset", "random", "keep-easy", "stratified", "prototype")
FIRST_KEEP_ONLY = ("keep-easy", "stratified", "prototype")
PROTOTYPE_POLICY = "keep-hard"  # label-free prototypes: keep the far-from-prototype (hard) images
METRICS = ("linear_probe", "finetune", "knn")  # the encoder's protocols (baselines have them too)
TABLE_METRICS = (*METRICS, "supervised")  # + the supervised anchor (proxy trained on the kept set)
RUN_NAME = "run.json"  # DIR/run.json: the settings every result under DIR was made with
RECORD_NAME = "record.json"  # DIR/arms/<arm>-s<seed>/record.json: one finished arm and seed
FINETUNE_PREFIX = "evaluate.finetune_"  # the fine-tune's settings: not part of what a run.json pins
FULL_STEPS = 600
# The recipe the committed full run was made with (experiments/README.md says how each part was picked),
# applied before the user's `--set`, which win. The config's own defaults are MAE's: their peak lr of
# 3.75e-5 at batch 64 gives an encoder that loses to raw pixels here, so a run with them says nothing
# about curation. Data-specific settings (the decode size) stay the user's.
RECIPE = (
    "pretrain.batch_size=128",
    "pretrain.base_lr=3e-3",
    "pretrain.warmup_steps=60",
    "evaluate.finetune_epochs=3",
    "evaluate.finetune_lr=1e-3",
    "evaluate.finetune_batch_size=64",
)
CURVE_POINTS = 4  # checkpoints evaluated per arm (each quarter of the budget): the compute-to-reach curve
ANCHOR_EPOCHS = 15  # supervised anchor: proxy epochs on each kept set (the scores use score.epochs)
# `--quick` checks in minutes that every step runs, end to end: one seed, a sixth of the budget, two
# probed checkpoints, a short anchor and no fine-tune (QUICK_RECIPE: after RECIPE, before `--set`, so
# `--set evaluate.finetune_epochs=1` adds one back). Its encoders are too briefly trained to beat even
# their random initialisation, so its table says nothing about whether curation pays for pretraining.
QUICK_STEPS = 100
QUICK_CURVE_POINTS = 2
QUICK_ANCHOR_EPOCHS = 3
QUICK_RECIPE = ("evaluate.finetune_epochs=0",)


@dataclass(frozen=True)
class Arm:
    name: str  # e.g. offset@0.6
    policy: str  # the row's policy: full, offset, random, keep-easy, stratified, prototype
    keep: float

    @property
    def score(self) -> str:
        return "prototype" if self.policy == "prototype" else "el2n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", required=True, help="training image folder, <class>/<file> (demo-data writes one)"
    )
    p.add_argument("--test", required=True, help="clean labeled test folder (the official test split)")
    p.add_argument("--noise", type=float, default=0.2, help="share of training labels flipped (default 0.2)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the label flips")
    p.add_argument("--keep", default="0.6,0.4", help="kept fractions, comma-separated (default 0.6,0.4)")
    p.add_argument(
        "--offset", type=float, default=None, help="EL2N offset: hardest share dropped (default: --noise)"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3; --quick: 1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a check that everything runs: one seed, {QUICK_STEPS} steps, {QUICK_CURVE_POINTS} probed "
        f"checkpoints, a {QUICK_ANCHOR_EPOCHS}-epoch anchor, no fine-tune (QUICK_RECIPE)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help=f"pretraining steps per arm (default {FULL_STEPS})"
    )
    p.add_argument(
        "--anchor-epochs",
        type=int,
        default=None,
        help=f"epochs of the supervised anchor per arm (default {ANCHOR_EPOCHS}, --quick "
        f"{QUICK_ANCHOR_EPOCHS}; 0: skip it)",
    )
    p.add_argument("--policies", default=",".join(POLICIES), help=f"arms to run, of {','.join(POLICIES)}")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        help=f"config override key=value, after the experiment's recipe ({' '.join(RECIPE)})",
    )
    p.add_argument("--output", required=True, help="output folder")
    args = p.parse_args(argv)
    args.keeps = [float(k) for k in args.keep.split(",") if k.strip()]
    args.policy_list = [s.strip() for s in args.policies.split(",") if s.strip()]
    unknown = sorted(set(args.policy_list) - set(POLICIES))
    if unknown:
        p.error(f"unknown --policies {unknown}; choose from {', '.join(POLICIES)}")
    malformed = [s for s in args.sets if "=" not in s]
    if malformed:
        p.error(f"--set takes key=value, not {malformed[0]!r}")
    if not args.keeps or any(not 0 < k <= 1 for k in args.keeps):
        p.error("--keep takes fractions in (0, 1]")
    if not 0 <= args.noise < 1:
        p.error("--noise takes a fraction in [0, 1)")
    if args.quick:
        args.seeds = 1
    args.sets = [*RECIPE, *(QUICK_RECIPE if args.quick else ()), *args.sets]
    args.steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    args.curve_points = QUICK_CURVE_POINTS if args.quick else CURVE_POINTS
    if args.anchor_epochs is None:
        args.anchor_epochs = QUICK_ANCHOR_EPOCHS if args.quick else ANCHOR_EPOCHS
    args.offset = args.noise if args.offset is None else args.offset
    return args


def plan_arms(keeps: list[float], policies: list[str]) -> list[Arm]:
    arms = [Arm("full", "full", 1.0)] if "full" in policies else []
    for policy in ("offset", "random"):
        if policy in policies:
            arms += [Arm(f"{policy}@{k:g}", policy, k) for k in keeps]
    for policy in FIRST_KEEP_ONLY:
        if policy in policies:
            arms.append(Arm(f"{policy}@{keeps[0]:g}", policy, keeps[0]))
    return arms


# ------------------------------------------------------------------------------------------------ labels


def noisy_labels(paths: list[str], names: list[str], noise: float, seed: int) -> pd.DataFrame:
    """The labels table: `noise` of the rows (sorted by path) moved to another class, chosen by `seed`."""
    frame = pd.DataFrame({"path": paths, "true_class": names}).sort_values("path", ignore_index=True)
    classes = sorted(set(names))
    true = frame["true_class"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    rng = np.random.default_rng(seed)
    flip = rng.choice(len(frame), size=round(noise * len(frame)), replace=False)
    label = true.copy()
    if len(classes) > 1:
        label[flip] = (true[flip] + rng.integers(1, len(classes), size=len(flip))) % len(classes)
    frame["label"] = label
    frame["class_name"] = [classes[i] for i in label]
    frame["noisy"] = label != true
    return frame[["path", "label", "class_name", "true_class", "noisy"]]


# ------------------------------------------------------------------------------------------------ resume


def write_json(path: Path, value: Any) -> None:
    """Write atomically (a temporary sibling, then a rename): a kill leaves the old file or none."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str))
    temporary.replace(path)


def pretraining_sets(sets: list[str]) -> dict[str, str]:
    """The overrides the pretrained encoders depend on, as each key's last value: all but the fine-tune's,
    which each record carries itself (`finetune_recipe`) so that a rerun can add or redo the fine-tune on
    finished arms. A map, so that the same settings given in another order or twice compare equal (a
    run.json written before `RECIPE` lists them as the user gave them)."""
    pairs = (s.split("=", 1) for s in sets if not s.startswith(FINETUNE_PREFIX))
    return {key.strip(): value.strip() for key, value in pairs}


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every result under `--output` depends on (the arms and seeds may grow between reruns)."""
    keys = ("data", "test", "noise", "noise_seed", "offset", "steps", "curve_points", "anchor_epochs")
    return {**{key: getattr(args, key) for key in keys}, "sets": pretraining_sets(args.sets)}


def claim_output(output: Path, settings: dict[str, Any]) -> None:
    """Record `settings` in `output/run.json`, or check that an earlier run there used the same ones."""
    path = output / RUN_NAME
    if path.exists():
        earlier = json.loads(path.read_text())
        sets = earlier.get("sets", {})
        earlier["sets"] = pretraining_sets(sets) if isinstance(sets, list) else sets  # list: older runs
        earlier.setdefault("curve_points", CURVE_POINTS)  # runs from before --quick probed fewer
        changed = sorted(k for k in settings.keys() | earlier.keys() if earlier.get(k) != settings.get(k))
        if changed:
            raise SystemExit(
                f"{output} holds results made with other settings ({', '.join(changed)} differ; see {path}): "
                "rerun with the same settings to resume, or pass a new --output"
            )
        log.info("resuming the run in %s", output)
        return
    write_json(path, settings)


# ------------------------------------------------------------------------------------------------ stages


def overrides(args: argparse.Namespace, **fixed: Any) -> list[str]:
    """`--steps`, then the user's `--set`, then what the script itself fixes (later wins)."""
    return [f"pretrain.steps={args.steps}", *args.sets, *(f"{k}={v}" for k, v in fixed.items())]


def score_folder(args: argparse.Namespace, labels_url: str, method: str) -> str:
    """Curate (score, no pruning) the training folder with the noisy labels; returns the manifest URL."""
    from pipeline.core.config import load_config
    from pipeline.curate import curate
    from stages.manifest import MANIFEST_NAME

    out = str(Path(args.output) / f"curate-{method}")
    published = Path(out) / MANIFEST_NAME
    if published.exists():  # written by an earlier run of this DIR (run.json says with these settings)
        log.info("reusing the %s scores of an earlier run: %s", method, published)
        return str(published)
    config = load_config(
        None,
        overrides(
            args,
            **{
                "data.input": args.data,
                "data.labels": labels_url,
                "output": out,
                "score.method": method,
                "prune.policy": "none",
            },
        ),
    )
    result = curate(config)
    log.info("scored %s: %s", method, result.counts)
    return result.manifest_url


def prune_arm(arm: Arm, seed: int, scored_url: str, out: str, args: argparse.Namespace) -> pd.DataFrame:
    """Re-prune the scored manifest for `arm` into `out/manifest.parquet` (as a sweep trial does)."""
    from pipeline.core.config import load_config
    from stages.manifest import MANIFEST_NAME, read_table, write_manifest
    from stages.prune import prune

    policy = {"full": "none", "prototype": PROTOTYPE_POLICY}.get(arm.policy, arm.policy)
    config = load_config(
        None,
        overrides(
            args,
            **{
                "prune.policy": policy,
                "prune.keep": arm.keep,
                "prune.offset": args.offset,
                "prune.seed": seed,
            },
        ),
    )
    frame, metadata = read_table(scored_url)
    pruned = prune(frame.drop(columns=["kept", "reason"]), config.prune)
    metadata = {**metadata, "config": config.redacted(), "scored_manifest": scored_url}
    write_manifest(str(Path(out) / MANIFEST_NAME), pruned, metadata)
    return pruned


def noisy_kept(pruned: pd.DataFrame, labels: pd.DataFrame) -> int:
    noisy = set(labels.loc[labels["noisy"], "path"])
    kept = pruned.loc[pruned["kept"], "path"]
    return int(kept.isin(noisy).sum())


@dataclass
class Evaluation:
    """What every arm is measured on, decoded once: the training folder's images with their true labels
    (what the probes, the fine-tune and the anchor learn from; the anchor with the flipped labels) and the
    clean test folder. `paths` names `split.train_images` row for row."""

    split: Any  # pipeline.evaluate.LabeledSplit
    paths: list[str]
    size: Any  # pipeline.models.mae.MAESize
    config: Any  # the evaluation's Config: true labels, `--test` as the test split
    device: Any  # torch.device


def load_evaluation(args: argparse.Namespace) -> Evaluation:
    from pipeline.core.config import load_config
    from pipeline.evaluate import LabeledSplit, labeled_names, load_named, resolve_device
    from pipeline.models.mae import size_of
    from stages.stream import decode_flagged

    # data.labels=null: the true labels (folder names or demo truth), never the flipped ones
    config = load_config(None, overrides(args, **{"data.labels": "null", "evaluate.test_data": args.test}))
    size = size_of(config)
    paths, names, _ = labeled_names(args.data, config)
    images, ok, _ = decode_flagged(paths, config, size.img_size)
    test_images, test_names, _ = load_named(args.test, config, size.img_size)
    classes = sorted(set(names) | set(test_names))
    index = {c: i for i, c in enumerate(classes)}
    split = LabeledSplit(
        train_images=images[ok],
        train_labels=np.asarray([index[n] for n, good in zip(names, ok, strict=True) if good], np.int64),
        test_images=test_images,
        test_labels=np.asarray([index[n] for n in test_names], np.int64),
        classes=classes,
        labels="true labels",
        test=args.test,
    )
    kept_paths = [p for p, good in zip(paths, ok, strict=True) if good]
    return Evaluation(split, kept_paths, size, config, resolve_device(config.evaluate.device))


def baseline_scores(evaluation: Evaluation) -> dict[str, dict[str, float | None]]:
    """Raw pixels (kNN, probe) and the architecture at its init (every protocol): once for all arms."""
    from pipeline.evaluate import encoder_scores, pixel_scores, random_encoder

    split, config, device = evaluation.split, evaluation.config, evaluation.device
    pixels = pixel_scores(split, config, device)
    random_init = encoder_scores(random_encoder(evaluation.size, config), split, config, device)
    return {
        "pixels": {"linear_probe": pixels["probe"], "finetune": None, "knn": pixels["knn"]},
        "random_init": {
            "linear_probe": random_init["probe"],
            "finetune": random_init["finetune"],
            "knn": random_init["knn"],
        },
    }


def checkpoint_curve(
    run_dir: Path, evaluation: Evaluation, known: dict[int, dict] | None = None
) -> list[dict]:
    """kNN and linear probe of every checkpoint the run kept, by step: how fast an arm's encoder improves
    (what "compute to reach" reads). Probes only; the fine-tune is for the final encoder. `known` maps a
    step to its point when it was measured already (the final encoder is the last checkpoint's: probing
    it twice cost ~30 s per arm)."""
    import torch

    from pipeline.evaluate import encoder_scores
    from pipeline.models.checkpoint import encoder_from_state
    from pipeline.models.mae import MaskedAutoencoder

    known = known or {}
    curve = list(known.values())
    for state_file in sorted(run_dir.glob("checkpoints/*/checkpoint_*/state.pt")):
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if int(state["step"]) in known:
            continue
        model = MaskedAutoencoder(evaluation.size)
        model.load_state_dict(state["model"])
        encoder = encoder_from_state(evaluation.size, model.encoder_state_dict())
        scores = encoder_scores(encoder, evaluation.split, evaluation.config, evaluation.device, False)
        curve.append({"step": int(state["step"]), "linear_probe": scores["probe"], "knn": scores["knn"]})
    return sorted(curve, key=lambda point: point["step"])


def supervised_anchor(
    pruned: pd.DataFrame, labels: pd.DataFrame, evaluation: Evaluation, epochs: int, seed: int
) -> float:
    """Data Diet's own check that the scores are right: the proxy architecture (`score.model`) trained
    for `epochs` on the arm's kept images with the labels curation saw (flipped ones included), accuracy
    on the clean test split."""
    import torch

    from pipeline.models.proxy import ArrayWindows, ProxySpec, to_input, train_proxy

    split, config = evaluation.split, evaluation.config
    index = {c: i for i, c in enumerate(split.classes)}
    label_of = dict(zip(labels["path"], labels["class_name"].map(index), strict=True))
    kept = set(pruned.loc[pruned["kept"], "path"])
    rows = np.asarray([i for i, p in enumerate(evaluation.paths) if p in kept], dtype=np.int64)
    y = np.asarray([label_of[evaluation.paths[i]] for i in rows], dtype=np.int64)
    score = config.score.model_copy(update={"epochs": epochs})
    spec = ProxySpec.from_config(score, len(split.classes), image_size=evaluation.size.img_size)
    spec = replace(spec, threads=torch.get_num_threads())  # the driver's, not a proxy task's
    trained = train_proxy(ArrayWindows(split.train_images[rows]), y, spec, seed)
    model = spec.build()
    model.load_state_dict(trained.state)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(split.test_images), 512):
            logits = model(to_input(split.test_images[start : start + 512]))
            correct += int((logits.argmax(1).numpy() == split.test_labels[start : start + 512]).sum())
    return correct / len(split.test_labels)


def run_arm(
    arm: Arm,
    seed: int,
    scored_url: str,
    labels: pd.DataFrame,
    evaluation: Evaluation,
    args: argparse.Namespace,
) -> dict:
    from pipeline.core.config import load_config
    from pipeline.evaluate import encoder_scores
    from pipeline.models.checkpoint import encoder_from_state, read_encoder_state
    from pipeline.train import pretrain
    from stages.manifest import MANIFEST_NAME

    out = Path(args.output) / "arms" / f"{arm.name}-s{seed}"
    if (out / RECORD_NAME).exists():
        log.info("%s seed %d: reusing the record of an earlier run", arm.name, seed)
        return refresh_finetune(json.loads((out / RECORD_NAME).read_text()), out, evaluation)
    if out.exists():  # cut off before its record: its checkpoints would resume mid-run, so start over
        log.info("%s seed %d: an earlier run stopped part-way; starting it again", arm.name, seed)
        shutil.rmtree(out)
    pruned = prune_arm(arm, seed, scored_url, str(out), args)
    # A checkpoint at each 1/curve_points of the budget (quarters in the full run), all kept.
    every = max(1, args.steps // args.curve_points)
    config = load_config(
        None,
        overrides(
            args,
            **{
                "pretrain.seed": seed,
                "pretrain.checkpoint_every": every,
                "pretrain.num_to_keep": args.curve_points + 1,
            },
        ),
    )
    start = time.perf_counter()
    trained = pretrain(config, str(out / MANIFEST_NAME), str(out), run_name=f"{arm.name}-s{seed}")
    pretrain_seconds = time.perf_counter() - start
    encoder = encoder_from_state(evaluation.size, read_encoder_state(str(out / "encoder.pth")))
    final = encoder_scores(encoder, evaluation.split, evaluation.config, evaluation.device)
    record = {
        "arm": arm.name,
        "policy": arm.policy,
        "keep": arm.keep,
        "seed": seed,
        "linear_probe": final["probe"],
        "finetune": final["finetune"],
        "finetune_recipe": finetune_recipe(evaluation.config),
        "knn": final["knn"],
        "supervised": supervised_anchor(pruned, labels, evaluation, args.anchor_epochs, seed)
        if args.anchor_epochs
        else None,
        "noisy_kept": noisy_kept(pruned, labels),
        "kept": int(pruned["kept"].sum()),
        "steps": trained.steps,
        "final_loss": trained.final_loss,
        "pretrain_seconds": round(pretrain_seconds, 1),
        "curve": checkpoint_curve(
            out,
            evaluation,
            {trained.steps: {"step": trained.steps, "linear_probe": final["probe"], "knn": final["knn"]}},
        ),
    }
    log.info("%s seed %d: %s", arm.name, seed, {k: record[k] for k in (*METRICS, "noisy_kept", "kept")})
    write_json(out / RECORD_NAME, record)
    return record


def finetune_recipe(config: Any) -> dict[str, Any]:
    """The settings a record's `finetune` was measured with (epochs 0: none was)."""
    ev = config.evaluate
    return {
        "epochs": ev.finetune_epochs,
        "lr": ev.finetune_lr,
        "layer_decay": ev.finetune_layer_decay,
        "batch_size": ev.finetune_batch_size,
    }


def refresh_finetune(record: dict, out: Path, evaluation: Evaluation) -> dict:
    """A reused record whose fine-tune was measured with another recipe than this run's (or not at all)
    gets this run's, from the arm's saved final encoder: a full run made without the fine-tune can add it
    later without pretraining again. The record is rewritten; without `encoder.pth` that is an error."""
    from pipeline.evaluate import split_finetune_accuracy
    from pipeline.models.checkpoint import encoder_from_state, read_encoder_state

    recipe = finetune_recipe(evaluation.config)
    earlier = record.get("finetune_recipe", {"epochs": 0})  # records from before recipes were kept
    if recipe["epochs"] == 0 or earlier == recipe:  # nothing asked, or measured already: keep it
        return record
    weights = out / "encoder.pth"
    if not weights.exists():
        raise SystemExit(
            f"{out / RECORD_NAME} has no fine-tune with {recipe} and {weights} is gone: delete the record "
            "to pretrain this arm again, or rerun with the recipe it was made with"
        )
    encoder = encoder_from_state(evaluation.size, read_encoder_state(str(weights)))
    record["finetune"] = split_finetune_accuracy(
        encoder, evaluation.split, evaluation.config, evaluation.device
    )
    record["finetune_recipe"] = recipe
    log.info(
        "%s seed %d: fine-tuned the saved encoder %s: %.4f",
        record["arm"],
        record["seed"],
        recipe,
        record["finetune"],
    )
    write_json(out / RECORD_NAME, record)
    return record


def steps_to_reach(records: list[dict], metric: str = "linear_probe") -> None:
    """Fill each record's `steps_to_full`: the first checkpoint step at which its `metric` reaches the
    full-data arm's final mean (over seeds); None when it never does within the budget or there is no
    full arm. The compute an arm saves (or costs) against pretraining on everything."""
    full = [r[metric] for r in records if r["policy"] == "full"]
    target = float(np.mean(full)) if full else None
    for record in records:
        reached = [p["step"] for p in record["curve"] if target is not None and p[metric] >= target]
        record["steps_to_full"] = min(reached) if reached else None


# ------------------------------------------------------------------------------------------------ output


def summary_table(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(records)
    rows = []
    for (arm, policy, keep), group in frame.groupby(["arm", "policy", "keep"], sort=False):
        row = {"arm": arm, "policy": policy, "keep": keep, "seeds": len(group)}
        row["kept"] = float(group["kept"].mean())
        row["noisy_kept"] = float(group["noisy_kept"].mean())
        reached = group["steps_to_full"].dropna() if "steps_to_full" in group else pd.Series(dtype=float)
        row["steps_to_full"] = float(reached.mean()) if len(reached) else float("nan")
        row["reached"] = len(reached)
        for metric in TABLE_METRICS:
            values = pd.to_numeric(group[metric], errors="coerce").dropna()
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = float(values.std(ddof=0)) if len(values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "–"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _steps_cell(steps: float, reached: int, seeds: int) -> str:
    if not reached:
        return "not reached"
    return f"{steps:.0f}" + ("" if reached == seeds else f" ({reached}/{seeds})")


def write_markdown(path: Path, table: pd.DataFrame, baselines: dict, settings: dict) -> None:
    lines = [
        "# Curation pays? (experiments/curation_pays.py)",
        "",
        f"Training labels flipped: {settings['noise']:g} ({settings['noisy']} of {settings['images']}); "
        f"{settings['steps']} pretraining steps per arm; seeds {settings['seeds']}; "
        f"evaluated on {settings['test']}.",
        "",
        "| arm | policy | keep | seeds | kept | noisy kept | linear probe | fine-tune | kNN "
        "| supervised anchor | steps to full's probe |",
        "|-----|--------|------|-------|------|------------|--------------|-----------|-----"
        "|-------------------|-----------------------|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.arm} | {row.policy} | {row.keep:g} | {row.seeds} | {row.kept:.0f} | {row.noisy_kept:.1f} | "
            + " | ".join(_cell(getattr(row, f"{m}_mean"), getattr(row, f"{m}_std")) for m in TABLE_METRICS)
            + f" | {_steps_cell(row.steps_to_full, row.reached, row.seeds)} |"
        )
    for name, values in baselines.items():
        cells = " | ".join(_cell(values.get(m)) for m in TABLE_METRICS)
        lines.append(f"| {name} (baseline) | – | – | – | – | – | {cells} | – |")
    lines += [
        "",
        f"Supervised anchor: `{settings['anchor_model']}` trained {settings['anchor_epochs']} epochs on each "
        "kept set with the labels curation saw, clean test accuracy. Steps to full's probe: the first "
        f"checkpoint (every {settings['steps'] // settings['curve_points']} steps) whose linear probe "
        "reaches the full-data arm's final mean; (k/n): seeds that reached it within the budget.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(path: Path, table: pd.DataFrame, baselines: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in TABLE_METRICS if table[f"{m}_mean"].notna().any()]  # e.g. no fine-tune when off
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    full = table[table["policy"] == "full"]
    for ax, metric in zip(axes[0], metrics, strict=True):
        for policy, group in table[table["policy"] != "full"].groupby("policy", sort=False):
            group = pd.concat([group, full]).sort_values("keep")  # every policy's curve ends at full data
            ax.errorbar(
                group["keep"],
                group[f"{metric}_mean"],
                yerr=group[f"{metric}_std"],
                marker="o",
                label=policy,
                capsize=3,
            )
        if len(full) and table["policy"].nunique() == 1:
            ax.errorbar(
                full["keep"], full[f"{metric}_mean"], yerr=full[f"{metric}_std"], marker="o", label="full"
            )
        for (name, values), style in zip(baselines.items(), (":", "--"), strict=False):
            if values.get(metric) is not None:
                ax.axhline(values[metric], linestyle=style, color="grey", label=name)
        ax.set_xlabel("kept fraction")
        ax.set_ylabel(f"{metric} accuracy")
        ax.set_title(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from pipeline.core.config import load_config
    from pipeline.core.runtime import ray_session
    from pipeline.evaluate import labeled_names

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    claim_output(output, run_settings(args))
    base = load_config(None, overrides(args, **{"data.input": args.data}))
    paths, names, source = labeled_names(args.data, base)  # true labels: demo truth or folder names
    labels = noisy_labels(paths, names, args.noise, args.noise_seed)
    labels_url = str(output / "noisy_labels.parquet")
    labels.to_parquet(labels_url, index=False)
    log.info("flipped %d of %d labels (true labels: %s)", int(labels["noisy"].sum()), len(labels), source)

    arms = plan_arms(args.keeps, args.policy_list)
    records: list[dict] = []
    start = time.perf_counter()
    with ray_session(base.ray):
        scored = {
            method: score_folder(args, labels_url, method) for method in sorted({a.score for a in arms})
        }
        evaluation = load_evaluation(args)
        baselines = baseline_scores(evaluation)
        log.info("baselines: %s", baselines)
        for seed in range(args.seeds):  # every arm's seed 0 first: a run stopped early covers every arm
            for arm in arms:
                records.append(run_arm(arm, seed, scored[arm.score], labels, evaluation, args))
    steps_to_reach(records)
    settings = {
        "data": args.data,
        "test": args.test,
        "noise": args.noise,
        "noise_seed": args.noise_seed,
        "noisy": int(labels["noisy"].sum()),
        "images": len(labels),
        "true_labels": source,
        "keeps": args.keeps,
        "offset": args.offset,
        "seeds": args.seeds,
        "steps": args.steps,
        "curve_points": args.curve_points,
        "quick": args.quick,
        "sets": args.sets,
        "prototype_policy": PROTOTYPE_POLICY,
        "anchor_epochs": args.anchor_epochs,
        "anchor_model": evaluation.config.score.model,
        "train_images_evaluated": len(evaluation.paths),
        "test_images": len(evaluation.split.test_labels),
        "seconds": round(time.perf_counter() - start, 1),
    }
    result = {"arms": records, "baselines": baselines, "settings": settings}
    write_json(output / "curation_pays.json", result)
    table = summary_table(records)
    write_markdown(output / "curation_pays.md", table, baselines, settings)
    write_plot(output / "curation_pays.png", table, baselines)
    log.info("wrote %s/curation_pays.{json,md,png}", output)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
