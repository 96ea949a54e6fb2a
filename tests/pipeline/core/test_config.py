"""Config: defaults load, overrides apply, and every mistake is named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import ConfigError, dump_config, load_config


def test_defaults_load_and_round_trip(tmp_path: Path) -> None:
    config = load_config()
    assert config.score.method == "el2n" and config.pretrain.mask.ratio == 0.75
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_file_and_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  steps: 50\n  mask:\n    ratio: 0.6\n")
    config = load_config(path, ["pretrain.mask.ratio=0.9", "data.storage_options.anon=true"])
    assert config.pretrain.steps == 50
    assert config.pretrain.mask.ratio == 0.9
    assert config.data.storage_options == {"anon": True}


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  stpes: 50\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'pretrain\.stpes'"):
        load_config(path)


def test_unknown_set_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"'mask_ratio' is not a key of pretrain"):
        load_config(None, ["pretrain.mask_ratio=0.5"])


def test_bad_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"bad value for 'pretrain\.steps'.*'many'"):
        load_config(None, ["pretrain.steps=many"])


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_keep_fraction_out_of_range(value: str) -> None:
    with pytest.raises(ConfigError, match=r"prune\.keep"):
        load_config(None, [f"prune.keep={value}"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_schedule_needs_an_end_ratio() -> None:
    with pytest.raises(ConfigError, match="ratio_end"):
        load_config(None, ["pretrain.mask.schedule=linear"])


def test_secrets_are_redacted() -> None:
    config = load_config(None, ["data.storage_options.secret=hunter2"])
    assert "hunter2" not in dump_config(config)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).parents[3] / "examples").glob("*.yaml"))
)
def test_example_configs_load(name: str) -> None:
    config = load_config(Path(__file__).parents[3] / "examples" / name)
    assert config.output


def test_the_example_demo_is_the_embedded_demo() -> None:
    """`maskdiet run examples/demo.yaml` and `maskdiet run` train the same thing."""
    from importlib.resources import files

    embedded = load_config(str(files("pipeline.core") / "demo.yaml"))
    example = load_config(Path(__file__).parents[3] / "examples" / "demo.yaml")
    assert example.pretrain == embedded.pretrain and example.prune == embedded.prune


def test_command_flags_beat_the_file_and_set_beats_both(tmp_path: Path) -> None:
    from pipeline.cli.common import make_config

    path = tmp_path / "c.yaml"
    path.write_text("output: from-file\npretrain:\n  steps: 50\n  num_workers: 2\n")
    config = make_config(str(path), None, pretrain__steps=20, pretrain__num_workers=None)
    assert config.pretrain.steps == 20  # `maskdiet pretrain -c run/config.yaml --steps 20` trains 20 steps
    assert config.pretrain.num_workers == 2  # a flag left out keeps the file's value
    assert config.output.endswith("from-file")
    config = make_config(str(path), ["pretrain.steps=30"], pretrain__steps=20)
    assert config.pretrain.steps == 30


def test_keep_flag_wins_over_a_files_keep_count(tmp_path: Path) -> None:
    """`curate -c f.yaml --keep 0.5` keeps half even when f.yaml sets prune.keep_count (which beats keep)."""
    from pipeline.cli.common import keep_flag_wins, make_config

    path = tmp_path / "c.yaml"
    path.write_text("prune:\n  keep_count: 1000\n")
    config = keep_flag_wins(make_config(str(path), None, prune__keep=0.5), 0.5, None)
    assert config.prune.keep_count is None and config.prune.keep == 0.5
    assert keep_flag_wins(make_config(str(path), None), None, None).prune.keep_count == 1000  # no flag
    both = ["prune.keep_count=7"]
    assert keep_flag_wins(make_config(str(path), both, prune__keep=0.5), 0.5, both).prune.keep_count == 7


def test_dotted_keys_walk_nested_data() -> None:
    """One walker for `--set`, `tune.space`, command flags and resumed sweeps: get, set, nest and flatten."""
    from pipeline.core.config import flatten_dotted, get_dotted, nest_dotted, set_dotted

    data = {"pretrain": {"mask": {"ratio": 0.75, "schedule": "constant"}}}
    assert get_dotted(data, "pretrain.mask.ratio") == 0.75
    assert get_dotted(load_config(), "pretrain.mask.ratio") == 0.75  # a Config and its sections too
    assert get_dotted(data, "") is data
    assert get_dotted(data, "pretrain.steps", default=None) is None
    with pytest.raises(KeyError, match=r"pretrain\.steps"):
        get_dotted(data, "pretrain.steps")

    set_dotted(data, "pretrain.steps", 5)
    set_dotted(data, "pretrain.mask", {"ratio": 0.6}, merge=True)  # a section axis: the other keys stay
    assert data == {"pretrain": {"mask": {"ratio": 0.6, "schedule": "constant"}, "steps": 5}}
    set_dotted(data, "pretrain.mask", {"ratio": 0.5})  # as --set does: the mapping replaces the section
    assert data["pretrain"]["mask"] == {"ratio": 0.5}
    value = {"anon": [1]}
    set_dotted(data, "data.storage_options", value)
    value["anon"].append(2)
    assert data["data"]["storage_options"] == {"anon": [1]}  # the value is copied in
    with pytest.raises(ConfigError, match=r"'steps' is not a section"):
        set_dotted(data, "pretrain.steps.x", 1)

    flat = {"output": "o", "pretrain.mask.ratio": 0.5, "pretrain.steps": 5}
    assert nest_dotted(flat) == {"output": "o", "pretrain": {"mask": {"ratio": 0.5}, "steps": 5}}
    assert flatten_dotted(nest_dotted(flat)) == flat


def test_dotted_keys_are_checked_against_the_schema() -> None:
    from pipeline.core.config import Config, MaskConfig, check_key, section_model

    assert section_model("pretrain.mask") is MaskConfig and section_model("") is Config
    assert section_model("pretrain.steps") is None
    check_key("pretrain.mask.ratio")
    check_key("data.storage_options.endpoint_url")  # a free-form mapping takes any sub-key
    with pytest.raises(
        ConfigError, match=r"unknown config key 'pretrain\.mask\.raito': 'raito' is not a key"
    ):
        check_key("pretrain.mask.raito")
    with pytest.raises(ConfigError, match=r"'nope' is not a key of the top level"):
        check_key("nope.x")
    with pytest.raises(ConfigError, match=r"'pretrain\.steps' is a value, not a section"):
        load_config(None, ["pretrain.steps.x=1"])
