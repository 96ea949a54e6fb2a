"""Search spaces: the documented format parses, every mistake is named before any trial, trial configs apply."""

from __future__ import annotations

import pytest
from ray import tune

from pipeline.core.config import ConfigError, load_config
from tuning.space import build_search_space, trial_config


def space_config(space: dict, *overrides: str):
    return load_config(None, list(overrides), base={"tune": {"space": space}})


def test_documented_space_parses_to_tune_domains() -> None:
    config = space_config(
        {
            "mask_ratio": {"uniform": [0.5, 0.95]},
            "schedule": {"grid": ["constant", "linear", "cosine", "step"]},
            "ratio_end": {"uniform": [0.75, 0.95]},
            "mask_strategy": {"choice": ["random", "block"]},
            "lr": {"loguniform": [1e-4, 1e-3]},
            "warmup_steps": {"randint": [0, 10]},
            "batch_size": {"choice": [16, 32]},
            "policy": {"choice": ["offset", "random"]},
            "keep": {"grid": [0.5, 1.0]},
        }
    )
    space = build_search_space(config)
    params = space.param_space()
    assert set(params) == {
        "pretrain.mask.ratio",
        "pretrain.mask.schedule",
        "pretrain.mask.ratio_end",
        "pretrain.mask.strategy",
        "pretrain.base_lr",
        "pretrain.warmup_steps",
        "pretrain.batch_size",
        "prune.policy",
        "prune.keep",
    }
    assert isinstance(params["pretrain.mask.ratio"], tune.search.sample.Float)
    assert params["pretrain.mask.schedule"] == {"grid_search": ["constant", "linear", "cosine", "step"]}
    assert space.grid_size() == 8 and space.prunes
    # Optuna cannot expand grids: they become choices.
    assert isinstance(space.param_space(grid_ok=False)["prune.keep"], tune.search.sample.Categorical)


def test_sampled_values_make_valid_trial_configs() -> None:
    config = space_config(
        {
            "mask_ratio": {"uniform": [0.5, 0.95]},
            "warmup_steps": {"randint": [0, 10]},
            "keep": {"grid": [0.5]},
        }
    )
    space = build_search_space(config)
    domains = space.param_space()
    base = config.model_dump()
    for seed in range(20):
        ratio = domains["pretrain.mask.ratio"].sample(random_state=seed)
        warmup = domains["pretrain.warmup_steps"].sample(random_state=seed)
        trial = trial_config(base, {"pretrain.mask.ratio": ratio, "pretrain.warmup_steps": warmup})
        assert 0.5 <= trial.pretrain.mask.ratio <= 0.95
        assert 0 <= trial.pretrain.warmup_steps <= 10  # randint's upper end is included


def test_section_axis_moves_a_schedule_with_its_ends() -> None:
    config = space_config(
        {
            "pretrain.mask": {
                "grid": [{"schedule": "cosine", "ratio": 0.6, "ratio_end": 0.9}, {"schedule": "constant"}]
            }
        }
    )
    space = build_search_space(config)
    assert not space.prunes
    trial = trial_config(
        config.model_dump(), {"pretrain.mask": {"schedule": "cosine", "ratio": 0.6, "ratio_end": 0.9}}
    )
    assert (trial.pretrain.mask.schedule, trial.pretrain.mask.ratio, trial.pretrain.mask.ratio_end) == (
        "cosine",
        0.6,
        0.9,
    )
    assert trial.pretrain.mask.strategy == config.pretrain.mask.strategy  # the rest of the section is kept


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"schedule": {"grid": ["constant", "exponential"]}},
            r"tune\.space\.schedule: bad value 'exponential'",
        ),
        (
            {"mask_ratio": {"uniform": [0.5, 1.0]}},
            r"tune\.space\.mask_ratio: mask ratio .* \(0, 1\), got 1\.0",
        ),
        ({"mask_ratio": {"grid": [0.0, 0.75]}}, r"tune\.space\.mask_ratio: mask ratio .* got 0\.0"),
        ({"ratio_end": {"choice": [1.5]}}, r"tune\.space\.ratio_end: mask ratio"),
        ({"pretrain.mask": {"choice": [{"schedule": "linear", "ratio_end": -0.1}]}}, r"mask ratio"),
        ({"mask_raito": {"grid": [0.5]}}, r"unknown tune\.space key 'mask_raito'"),
        ({"pretrain.mask.raito": {"grid": [0.5]}}, r"'raito' is not a key of pretrain\.mask"),
        ({"score.epochs": {"grid": [1, 2]}}, r"'score\.epochs' cannot be swept: .* never rescores"),
        ({"output": {"grid": ["a"]}}, r"'output' cannot be swept"),
        (
            {"schedule": {"grid": ["constant", "linear"]}},
            r"schedule='linear' needs pretrain\.mask\.ratio_end",
        ),
        ({"keep": {"uniform": [0.5, 1.5]}}, r"tune\.space\.keep: bad value 1\.5 for prune\.keep"),
        ({"lr": {"loguniform": [0, 1e-3]}}, r"loguniform needs 0 < low"),
        ({"lr": {"uniform": [1e-3, 1e-4]}}, r"needs low < high"),
        ({"batch_size": [16, 32]}, r"bare list is ambiguous"),
        ({"batch_size": {"choice": []}}, r"non-empty list"),
        ({"batch_size": {"normal": [1, 2]}}, r"tune\.space\.batch_size"),
        (
            {"mask_ratio": {"grid": [0.5]}, "pretrain.mask.ratio": {"grid": [0.6]}},
            r"names 'pretrain\.mask\.ratio' twice",
        ),
        ({}, r"tune\.space is empty"),
    ],
)
def test_bad_space_is_rejected_naming_the_key(space: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_search_space(space_config(space))


def test_schedule_axis_is_valid_once_the_end_ratio_is_set() -> None:
    swept = {"schedule": {"grid": ["constant", "linear", "step"]}}
    assert build_search_space(space_config(swept, "pretrain.mask.ratio_end=0.9")).grid_size() == 3
    with_end = {**swept, "ratio_end": {"uniform": [0.8, 0.95]}}
    assert build_search_space(space_config(with_end)).grid_size() == 3
