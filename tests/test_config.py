"""The typed config: presets, overrides, checks."""

import jax
import numpy as np
import pytest
from helpers import records_without_timings, tiny_config

from jax_mnist import train
from jax_mnist.checkpoint import Checkpoints
from jax_mnist.cli import build_parser
from jax_mnist.config import (
    FIELDS,
    LOCAL_FIELDS,
    PRESETS,
    RESULT_NEUTRAL_FIELDS,
    ROLES,
    SEARCHABLE_FIELDS,
    Config,
    field_type,
    fields_with_role,
    option,
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


SCHEDULE_ONLY_CHANGES = {
    "log_every": 3,
    "checkpoint_every": 2,
    "checkpoint_every_steps": 5,
    "keep": 1,
    "progress": "bar",
    "tensorboard": False,
    "devices": 1,
    "cache_dir": "elsewhere",
    "tfds_data_dir": "elsewhere",
    "deterministic": False,
    "compilation_cache": False,
}


def test_every_result_neutral_field_has_a_change_tried_below():
    assert set(SCHEDULE_ONLY_CHANGES) == RESULT_NEUTRAL_FIELDS


# The sets as they were kept by hand in 0.2.0, before each field said its role: the sets
# computed from the roles must stay these (a field added since must be added here knowingly).
SETS_OF_0_2_0 = {
    # config.SCHEDULE_ONLY_FIELDS: what may change when a run resumes (and epochs, by logic)
    "schedule_only": {
        "log_every",
        "checkpoint_every",
        "checkpoint_every_steps",
        "keep",
        "progress",
        "tensorboard",
        "devices",
        "cache_dir",
        "tfds_data_dir",
        "deterministic",
        "compilation_cache",
    },
    # tune.space.NOT_SEARCHABLE, less the above
    "not_searchable": {
        "preset",
        "dataset",
        "data_dir",
        "data_source",
        "val_size",
        "val_seed",
        "seed",
        "eval_batch_size",
    },
}


def test_sets_computed_from_roles_are_those_kept_by_hand_before():
    from jax_mnist.resume import RESULT_NEUTRAL_FIELDS as resume_may_change
    from jax_mnist.tune.study import PER_COMMAND_FIELDS

    schedule_only = SETS_OF_0_2_0["schedule_only"]
    assert RESULT_NEUTRAL_FIELDS == resume_may_change == schedule_only
    assert set(FIELDS) - SEARCHABLE_FIELDS == SETS_OF_0_2_0["not_searchable"] | schedule_only
    assert schedule_only | {"data_dir"} == PER_COMMAND_FIELDS  # tune.study.LOCAL_FIELDS of 0.2.0
    assert fields_with_role("machine") | {"data_dir"} == LOCAL_FIELDS
    assert fields_with_role(*ROLES) == set(FIELDS)
    assert fields_with_role("schedule") == {
        "log_every",
        "checkpoint_every",
        "checkpoint_every_steps",
        "keep",
        "progress",
        "tensorboard",
    }


def test_option_refuses_a_role_it_does_not_know_and_a_searchable_non_result_field():
    with pytest.raises(ValueError, match="role must be one of"):
        option(0, "x", role="output")
    with pytest.raises(ValueError, match="cannot be searchable"):
        option(0, "x", role="schedule", searchable=True)
    with pytest.raises(ValueError, match="unknown roles"):
        fields_with_role("output")


def _first_epoch(workdir):
    epoch = next(r for r in records_without_timings(workdir) if r["kind"] == "epoch")
    with Checkpoints(workdir, read_only=True) as checkpoints:
        config = checkpoints.read_config()
        setup = train.create_setup(config, steps_per_epoch=1)
        state, _ = checkpoints.restore(train.abstract_train_state(setup), 16)
    return epoch, state


@pytest.fixture(scope="module")
def reference_epoch(tiny_run_one_epoch):
    return _first_epoch(tiny_run_one_epoch.workdir)  # a run of tiny_config(epochs=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(SCHEDULE_ONLY_CHANGES), "epochs"])
def test_fields_that_may_change_on_resume_do_not_change_what_is_computed(name, reference_epoch, tmp_path):
    # epochs may change on resume with the constant schedule only (Config.schedule_spans_run).
    value = 2 if name == "epochs" else SCHEDULE_ONLY_CHANGES[name]
    config = tiny_config(epochs=1).replace(**{name: value})
    assert getattr(config, name) != getattr(tiny_config(), name) or name == "epochs"
    train.train_and_evaluate(config, tmp_path / "run")
    epoch, state = _first_epoch(tmp_path / "run")
    expected_epoch, expected_state = reference_epoch
    for key in ("step", "train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert epoch[key] == expected_epoch[key], key
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
