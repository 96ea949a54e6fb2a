"""The one set of tiny-run settings the end-to-end tests share: every stage runs for real (Ray Data, Ray
Train, evaluation, report), just small. A test that needs a longer or different run adds its own `--set`
after these (later wins)."""

from __future__ import annotations

# curation: one brief proxy CNN instead of score.num_models=5 trained for 10 epochs
TINY_CURATE = {"score.num_models": 1, "score.epochs": 1}

# pretraining: the smallest MAE for a few steps, validated and checkpointed once
TINY_PRETRAIN = {
    "pretrain.model": "mae_vit_micro_patch4",
    "pretrain.steps": 4,
    "pretrain.batch_size": 8,
    "pretrain.val_images": 8,
    "pretrain.eval_every": 2,
    "pretrain.log_every": 2,
    "pretrain.checkpoint_every": 4,
}

# evaluation: a small kNN and a short linear probe
TINY_EVALUATE = {"evaluate.knn_k": 3, "evaluate.probe_epochs": 2}

TINY_RUN = {**TINY_CURATE, **TINY_PRETRAIN, **TINY_EVALUATE}


def as_sets(settings: dict[str, object]) -> list[str]:
    """`--set key=value` arguments for the command line."""
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def as_overrides(settings: dict[str, object]) -> list[str]:
    """`key=value` overrides for `load_config(None, overrides)`."""
    return [f"{key}={value}" for key, value in settings.items()]
