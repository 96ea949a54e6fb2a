"""Search spaces for sweeps, read from `tune.space` in the config and checked before any trial starts.

Format: `tune.space` maps a config key to a domain. A key is a dotted config key under `pretrain` or
`prune` (as with `--set`), or one of the short aliases in `ALIASES`. A domain is one of

    {uniform: [low, high]}        a float drawn uniformly in [low, high]
    {loguniform: [low, high]}     a float drawn log-uniformly (learning rates); 0 < low
    {randint: [low, high]}        an integer in [low, high], both ends included
    {choice: [a, b, ...]}         one value drawn per trial
    {grid: [a, b, ...]}           every value, each once per sample (`num_samples` repeats the grid)
    a plain value                 fixed for every trial (a mapping is merged into the section it names)

A key naming a section (`pretrain.mask`) takes mappings, so a schedule with its ends moves as one:

    tune:
      space:
        mask_ratio: {uniform: [0.5, 0.95]}
        schedule: {grid: [constant, linear]}
        ratio_end: {uniform: [0.75, 0.95]}          # used by non-constant schedules
        pretrain.mask: {grid: [{schedule: cosine, ratio: 0.6, ratio_end: 0.9}, {schedule: constant}]}
        lr: {loguniform: [1.0e-4, 1.0e-3]}
        policy: {choice: [offset, random]}        # re-prunes the one scored manifest in every trial
        keep: {grid: [0.5, 0.7, 1.0]}

Checks, all before Ray or any trial starts: the key exists and may be swept (`score.*` may not: a sweep
prunes one scored manifest, it never rescores), the domain kind is known, ranges are ordered, mask ratios lie
strictly inside (0, 1), and every corner of the space (each grid/choice value, each range end, in every
combination up to `MAX_CORNERS`) makes a valid `Config`, so an unknown schedule or a schedule without its
end ratio fails here, naming the key, instead of inside trial 5.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipeline.core.config import (
    Config,
    ConfigError,
    check_key,
    get_dotted,
    section_model,
    set_dotted,
)

log = logging.getLogger(__name__)

# Short names for the axes users sweep most; the dotted form of any pretrain/prune key works too.
ALIASES: dict[str, str] = {
    "mask_ratio": "pretrain.mask.ratio",
    "ratio_end": "pretrain.mask.ratio_end",
    "schedule": "pretrain.mask.schedule",
    "mask_strategy": "pretrain.mask.strategy",
    "lr": "pretrain.base_lr",
    "lr_schedule": "pretrain.lr_schedule",
    "warmup_steps": "pretrain.warmup_steps",
    "batch_size": "pretrain.batch_size",
    "steps": "pretrain.steps",
    "policy": "prune.policy",
    "keep": "prune.keep",
    "offset": "prune.offset",
}
SWEEPABLE_SECTIONS = ("pretrain", "prune")
DOMAIN_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
OPEN_UNIT_KEYS = ("pretrain.mask.ratio", "pretrain.mask.ratio_end")  # mask ratios: strictly inside (0, 1)
MAX_CORNERS = 4096  # combinations of corner values checked as whole configs

# The columns every results table carries, whatever was swept: (column, dotted config key).
STANDARD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("mask_ratio", "pretrain.mask.ratio"),
    ("ratio_end", "pretrain.mask.ratio_end"),
    ("schedule", "pretrain.mask.schedule"),
    ("mask_strategy", "pretrain.mask.strategy"),
    ("lr", "pretrain.base_lr"),
    ("warmup_steps", "pretrain.warmup_steps"),
    ("batch_size", "pretrain.batch_size"),
    ("policy", "prune.policy"),
    ("keep", "prune.keep"),
)


@dataclass(frozen=True)
class Axis:
    """One swept config key: `kind` is a domain kind or "fixed"; `values` for choice/grid/fixed,
    `low`/`high` for ranges."""

    key: str  # dotted config key, aliases resolved
    kind: str
    name: str = ""  # as written in tune.space (an alias or the dotted key), for error messages
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def is_section(self) -> bool:
        return section_model(self.key) is not None

    def corners(self) -> tuple[Any, ...]:
        """Values that bound this axis: every listed value, or both ends of a range."""
        if self.kind in ("uniform", "loguniform", "randint"):
            return (self.low, self.high)
        return self.values

    def tune_domain(self, grid_ok: bool = True) -> Any:
        """This axis as a Ray Tune domain (`grid_ok=False`: grids become choices, for searchers such as
        Optuna that cannot expand a grid)."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper end is exclusive
        if self.kind == "choice" or (self.kind == "grid" and not grid_ok):
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return self.values[0]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: the axes, in config order, and the base config they apply to."""

    axes: tuple[Axis, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(a.key for a in self.axes)

    @property
    def prunes(self) -> bool:
        """True when a trial must re-prune the scored manifest (a `prune.*` key is swept)."""
        return any(k == "prune" or k.startswith("prune.") for k in self.keys)

    def param_space(self, grid_ok: bool = True) -> dict[str, Any]:
        """Tune's `param_space`: one entry per dotted key (Tune flattens results as `config/<key>`)."""
        return {a.key: a.tune_domain(grid_ok) for a in self.axes}

    def has_grid(self) -> bool:
        return any(a.kind == "grid" for a in self.axes)

    def grid_size(self) -> int:
        return math.prod(len(a.values) for a in self.axes if a.kind == "grid")


def resolve_key(name: str) -> str:
    """Aliases → dotted config key; the key must exist in `Config` under a sweepable section."""
    key = ALIASES.get(name, name)
    parts = key.split(".")
    if parts[0] not in SWEEPABLE_SECTIONS:
        if parts[0] in Config.model_fields:
            why = (
                "a sweep prunes one scored manifest and never rescores"
                if parts[0] == "score"
                else f"only {', '.join(s + '.*' for s in SWEEPABLE_SECTIONS)} keys vary per trial"
            )
            raise ConfigError(f"tune.space key {name!r} cannot be swept: {why}")
        raise ConfigError(
            f"unknown tune.space key {name!r}: expected a dotted pretrain.* or prune.* config key "
            f"or one of the aliases {', '.join(sorted(ALIASES))}"
        )
    check_key(key, what="tune.space key")
    return key


def _parse_axis(name: str, key: str, spec: Any) -> Axis:
    where = f"tune.space.{name}"
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAIN_KINDS:
        kind, arg = next(iter(spec.items()))
    elif isinstance(spec, dict) and any(k in DOMAIN_KINDS for k in spec):
        raise ConfigError(f"{where}: a domain has exactly one kind, got {sorted(spec)}")
    elif isinstance(spec, list):
        raise ConfigError(f"{where}: a bare list is ambiguous; write {{grid: [...]}} or {{choice: [...]}}")
    else:
        return Axis(key=key, kind="fixed", values=(spec,), name=name)
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: {kind} expects a non-empty list of values, got {arg!r}")
        return Axis(key=key, kind=kind, values=tuple(arg), name=name)
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, int | float) for v in arg)):
        raise ConfigError(f"{where}: {kind} expects [low, high] numbers, got {arg!r}")
    low, high = float(arg[0]), float(arg[1])
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{arg[0]}, {arg[1]}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low, got {arg[0]}")
    if kind == "randint" and not all(float(v).is_integer() for v in arg):
        raise ConfigError(f"{where}: randint expects integer ends, got {arg!r}")
    return Axis(key=key, kind=kind, low=low, high=high, name=name)


def _check_axis_values(name: str, axis: Axis) -> None:
    """Per-axis checks that need no other key: section values are mappings, mask ratios inside (0, 1)."""
    where = f"tune.space.{name}"
    for value in axis.corners():
        if axis.is_section:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {axis.key!r} is a section; its values must be mappings")
            ratios = {f"{axis.key}.{k}": v for k, v in value.items()}
        else:
            ratios = {axis.key: value}
        for key, ratio in ratios.items():
            bad = not isinstance(ratio, int | float) or not 0.0 < float(ratio) < 1.0
            if key in OPEN_UNIT_KEYS and ratio is not None and bad:
                raise ConfigError(f"{where}: mask ratio must lie strictly inside (0, 1), got {ratio!r}")


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The config of one trial: `base` (a `Config.model_dump()`) with the trial's values applied in the
    space's order, validated. Raises ConfigError naming the offending keys."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(data, key, value, merge=True)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            if err["loc"]
            else err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise ConfigError(f"tune.space makes an invalid config ({shown}): {problems}") from None


def build_search_space(config: Config) -> SearchSpace:
    """Parse and validate `config.tune.space` (see the module docstring); raises ConfigError naming the key."""
    raw = config.tune.space
    if not raw:
        raise ConfigError(
            "tune.space is empty: name at least one axis, e.g. tune.space.mask_ratio={uniform: [0.5, 0.9]}"
        )
    axes: list[Axis] = []
    seen: dict[str, str] = {}
    for name, spec in raw.items():
        key = resolve_key(str(name))
        if key in seen:
            raise ConfigError(f"tune.space names {key!r} twice (as {seen[key]!r} and {name!r})")
        seen[key] = str(name)
        axis = _parse_axis(str(name), key, spec)
        _check_axis_values(str(name), axis)
        axes.append(axis)
    space = SearchSpace(axes=tuple(axes))
    _check_corners(config, space)
    return space


def _check_field_values(name: str, axis: Axis, base: dict[str, Any]) -> None:
    """Validate each corner value of one axis against its own section (field types, ranges, choices), so an
    error names the axis; rules across keys are left to `_check_corners`."""
    if axis.is_section:
        section_key, leaf = axis.key, ""
    else:
        section_key, _, leaf = axis.key.rpartition(".")
    model = section_model(section_key)
    assert model is not None, axis.key
    section = get_dotted(base, section_key)
    for value in axis.corners():
        updates = value if axis.is_section else {leaf: int(value) if axis.kind == "randint" else value}
        try:
            model.model_validate({**section, **updates})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(
                f"tune.space.{name}: bad value {value!r} for {section_key + '.' if section_key else ''}{loc}: "
                f"{err['msg']}"
            ) from None


def _check_corners(config: Config, space: SearchSpace) -> None:
    """Validate whole configs at the corners of the space (cross-key rules such as a schedule's end, and the
    model's shape)."""
    from pipeline.models.mae import size_of

    base = config.model_dump()
    for axis in space.axes:
        _check_field_values(axis.name or axis.key, axis, base)
    corner_lists = [a.corners() for a in space.axes]
    if math.prod(len(c) for c in corner_lists) > MAX_CORNERS:
        log.warning("search space has too many corners to check every combination; checking each axis alone")
        combos: Any = (
            tuple(values[0] if j != i else v for j, values in enumerate(corner_lists))
            for i, own in enumerate(corner_lists)
            for v in own
        )
    else:
        combos = itertools.product(*corner_lists)
    for combo in combos:
        params = {}
        for axis, value in zip(space.axes, combo, strict=True):
            params[axis.key] = int(value) if axis.kind == "randint" else value
        trial = trial_config(base, params)
        try:
            size_of(trial)  # model settings (name, image and decoder shapes) fail here, not in a trial
        except ValueError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(f"tune.space: the trial with {shown} has a bad model setting: {e}") from None


def describe(space: SearchSpace) -> list[tuple[str, str]]:
    """(key, domain) rows for printing a space."""
    rows = []
    for a in space.axes:
        if a.kind in ("uniform", "loguniform", "randint"):
            rows.append((a.key, f"{a.kind} [{a.low:g}, {a.high:g}]"))
        elif a.kind == "fixed":
            rows.append((a.key, f"fixed {a.values[0]!r}"))
        else:
            rows.append((a.key, f"{a.kind} {list(a.values)!r}"))
    return rows
