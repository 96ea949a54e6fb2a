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
4. Every arm pretrains the same model for the same steps and batch, once per seed (`pretrain.seed` and the
   random policy's seed), and is evaluated on the clean `--test` folder (kNN, linear probe, fine-tune),
   the probes learning from the training folder's true labels, never the flipped ones.

Writes `DIR/curation_pays.json` ({"arms": [...], "baselines": {"pixels", "random_init"}, "settings"}),
`DIR/curation_pays.md` (mean ± std per arm) and `DIR/curation_pays.png` (accuracy vs keep, per policy).
One Ray session serves the whole script. Not done here (see experiments/README.md): the compute to reach the
full-data arm's accuracy and the supervised Data Diet anchor.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("curation_pays")

POLICIES = ("full", "offset", "random", "keep-easy", "stratified", "prototype")
FIRST_KEEP_ONLY = ("keep-easy", "stratified", "prototype")
PROTOTYPE_POLICY = "keep-hard"  # label-free prototypes: keep the far-from-prototype (hard) images
METRICS = ("linear_probe", "finetune", "knn")
FULL_STEPS = 1500
QUICK_STEPS = 300


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
    p.add_argument("--quick", action="store_true", help=f"one seed, {QUICK_STEPS} steps")
    p.add_argument(
        "--steps", type=int, default=None, help=f"pretraining steps per arm (default {FULL_STEPS})"
    )
    p.add_argument("--policies", default=",".join(POLICIES), help=f"arms to run, of {','.join(POLICIES)}")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    p.add_argument("--output", required=True, help="output folder")
    args = p.parse_args(argv)
    args.keeps = [float(k) for k in args.keep.split(",") if k.strip()]
    args.policy_list = [s.strip() for s in args.policies.split(",") if s.strip()]
    unknown = sorted(set(args.policy_list) - set(POLICIES))
    if unknown:
        p.error(f"unknown --policies {unknown}; choose from {', '.join(POLICIES)}")
    if not args.keeps or any(not 0 < k <= 1 for k in args.keeps):
        p.error("--keep takes fractions in (0, 1]")
    if not 0 <= args.noise < 1:
        p.error("--noise takes a fraction in [0, 1)")
    if args.quick:
        args.seeds = 1
    args.steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
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


# ------------------------------------------------------------------------------------------------ stages


def overrides(args: argparse.Namespace, **fixed: Any) -> list[str]:
    """`--steps`, then the user's `--set`, then what the script itself fixes (later wins)."""
    return [f"pretrain.steps={args.steps}", *args.sets, *(f"{k}={v}" for k, v in fixed.items())]


def score_folder(args: argparse.Namespace, labels_url: str, method: str) -> str:
    """Curate (score, no pruning) the training folder with the noisy labels; returns the manifest URL."""
    from pipeline.core.config import load_config
    from pipeline.curate import curate

    out = str(Path(args.output) / f"curate-{method}")
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


def run_arm(arm: Arm, seed: int, scored_url: str, labels: pd.DataFrame, args: argparse.Namespace) -> dict:
    from pipeline.core.config import load_config
    from pipeline.evaluate import evaluate_encoder
    from pipeline.train import pretrain
    from stages.manifest import MANIFEST_NAME

    out = str(Path(args.output) / "arms" / f"{arm.name}-s{seed}")
    pruned = prune_arm(arm, seed, scored_url, out, args)
    config = load_config(None, overrides(args, **{"pretrain.seed": seed}))
    start = time.perf_counter()
    trained = pretrain(config, str(Path(out) / MANIFEST_NAME), out, run_name=f"{arm.name}-s{seed}")
    pretrain_seconds = time.perf_counter() - start
    # Probes learn from the training folder's true labels (folder names or demo truth), not the flipped ones.
    ev_config = load_config(None, overrides(args, **{"data.labels": "null", "evaluate.test_data": args.test}))
    result = evaluate_encoder(str(Path(out) / "encoder.pth"), args.data, ev_config)
    record = {
        "arm": arm.name,
        "policy": arm.policy,
        "keep": arm.keep,
        "seed": seed,
        "linear_probe": result.probe_accuracy,
        "finetune": result.finetune_accuracy,
        "knn": result.knn_accuracy,
        "noisy_kept": noisy_kept(pruned, labels),
        "kept": int(pruned["kept"].sum()),
        "steps": trained.steps,
        "final_loss": trained.final_loss,
        "pretrain_seconds": round(pretrain_seconds, 1),
    }
    baselines = {
        "pixels": {
            "linear_probe": result.pixel_probe_accuracy,
            "finetune": None,
            "knn": result.pixel_knn_accuracy,
        },
        "random_init": {
            "linear_probe": result.random_probe_accuracy,
            "finetune": result.random_finetune_accuracy,
            "knn": result.random_knn_accuracy,
        },
    }
    log.info("%s seed %d: %s", arm.name, seed, {k: record[k] for k in (*METRICS, "noisy_kept", "kept")})
    return {"record": record, "baselines": baselines, "evaluation": result.as_dict()}


# ------------------------------------------------------------------------------------------------ output


def summary_table(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(records)
    rows = []
    for (arm, policy, keep), group in frame.groupby(["arm", "policy", "keep"], sort=False):
        row = {"arm": arm, "policy": policy, "keep": keep, "seeds": len(group)}
        row["kept"] = float(group["kept"].mean())
        row["noisy_kept"] = float(group["noisy_kept"].mean())
        for metric in METRICS:
            values = pd.to_numeric(group[metric], errors="coerce").dropna()
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{metric}_std"] = float(values.std(ddof=0)) if len(values) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "–"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def write_markdown(path: Path, table: pd.DataFrame, baselines: dict, settings: dict) -> None:
    lines = [
        "# Curation pays? (experiments/curation_pays.py)",
        "",
        f"Training labels flipped: {settings['noise']:g} ({settings['noisy']} of {settings['images']}); "
        f"{settings['steps']} pretraining steps per arm; seeds {settings['seeds']}; "
        f"evaluated on {settings['test']}.",
        "",
        "| arm | policy | keep | seeds | kept | noisy kept | linear probe | fine-tune | kNN |",
        "|-----|--------|------|-------|------|------------|--------------|-----------|-----|",
    ]
    for row in table.itertuples():
        lines.append(
            f"| {row.arm} | {row.policy} | {row.keep:g} | {row.seeds} | {row.kept:.0f} | {row.noisy_kept:.1f} | "
            + " | ".join(_cell(getattr(row, f"{m}_mean"), getattr(row, f"{m}_std")) for m in METRICS)
            + " |"
        )
    for name, values in baselines.items():
        cells = " | ".join(_cell(values.get(m)) for m in METRICS)
        lines.append(f"| {name} (baseline) | – | – | – | – | – | {cells} |")
    lines.append("")
    path.write_text("\n".join(lines))


def write_plot(path: Path, table: pd.DataFrame, baselines: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), squeeze=False)
    full = table[table["policy"] == "full"]
    for ax, metric in zip(axes[0], METRICS, strict=True):
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
    base = load_config(None, overrides(args, **{"data.input": args.data}))
    paths, names, source = labeled_names(args.data, base)  # true labels: demo truth or folder names
    labels = noisy_labels(paths, names, args.noise, args.noise_seed)
    labels_url = str(output / "noisy_labels.parquet")
    labels.to_parquet(labels_url, index=False)
    log.info("flipped %d of %d labels (true labels: %s)", int(labels["noisy"].sum()), len(labels), source)

    arms = plan_arms(args.keeps, args.policy_list)
    records: list[dict] = []
    baselines: dict = {}
    evaluations: list[dict] = []
    start = time.perf_counter()
    with ray_session(base.ray):
        scored = {
            method: score_folder(args, labels_url, method) for method in sorted({a.score for a in arms})
        }
        for arm in arms:
            for seed in range(args.seeds):
                out = run_arm(arm, seed, scored[arm.score], labels, args)
                records.append(out["record"])
                evaluations.append({"arm": arm.name, "seed": seed, **out["evaluation"]})
                baselines = baselines or out["baselines"]  # the same split and init seed for every arm
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
        "quick": args.quick,
        "sets": args.sets,
        "prototype_policy": PROTOTYPE_POLICY,
        "seconds": round(time.perf_counter() - start, 1),
    }
    result = {"arms": records, "baselines": baselines, "settings": settings, "evaluations": evaluations}
    (output / "curation_pays.json").write_text(json.dumps(result, indent=2, default=str))
    table = summary_table(records)
    write_markdown(output / "curation_pays.md", table, baselines, settings)
    write_plot(output / "curation_pays.png", table, baselines)
    log.info("wrote %s/curation_pays.{json,md,png}", output)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
