"""The typed config: presets, overrides, checks."""

import dataclasses

import pytest

from jax_mnist.cli import build_parser
from jax_mnist.config import (
    FIELDS,
    PRESETS,
    SCHEDULE_ONLY_FIELDS,
    Config,
    field_type,
    preset_config,
    resolve_config,
)
from jax_mnist.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_named(name):
    config = preset_config(name).validate()
    assert config.preset == name


def _other_value(name):
    value = getattr(Config(), name)
    meta = FIELDS[name].metadata
    kind = field_type(name)
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != value)
    if kind is bool:
        return not value
    if kind is str:
        return "elsewhere"
    if value is None:
        return 1
    return (
        (meta["max"] if meta["max"] is not None and meta["max"] != value else value + 1)
        if kind is int
        else min(value + 0.01, meta["max"] or 1e9)
    )


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("name", sorted(set(FIELDS) - {"preset", "model", "dataset"}))
def test_every_flag_overrides_every_preset(preset, name):
    value = _other_value(name)
    config = resolve_config({"preset": preset, name: value})
    assert getattr(config, name) == value
    unchanged = {k for k in FIELDS if k != name}
    assert all(getattr(config, k) == getattr(preset_config(preset), k) for k in unchanged)


def test_cli_flags_after_a_preset_override_it():
    args = build_parser().parse_args(["train", "--preset", "best", "--epochs", "3", "--no-tensorboard"])
    flags = {k: getattr(args, k) for k in FIELDS if hasattr(args, k)}
    config = resolve_config(flags)
    assert (config.model, config.epochs, config.tensorboard) == ("vgg", 3, False)


def test_resume_keeps_the_stored_config_and_applies_given_changes():
    stored = preset_config("best").replace(epochs=4)
    assert resolve_config({"epochs": 8}, stored=stored) == stored.replace(epochs=8)
    assert resolve_config({"preset": "seed"}, stored=stored) == preset_config("seed")


def test_unknown_names_are_refused():
    for bad in ({"model": "alexnet"}, {"preset": "slow"}, {"dataset": "cifar"}):
        with pytest.raises(ConfigError):
            Config().replace(**bad).validate() if "preset" not in bad else preset_config(bad["preset"])


def test_schedule_only_fields_exist():
    assert set(FIELDS) >= SCHEDULE_ONLY_FIELDS
    assert all(dataclasses.is_dataclass(preset_config(p)) for p in PRESETS)
