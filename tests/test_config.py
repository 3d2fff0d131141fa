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


def test_the_sets_follow_from_each_fields_role():
    from jax_mnist.resume import RESULT_NEUTRAL_FIELDS as resume_may_change
    from jax_mnist.tune.study import PER_COMMAND_FIELDS

    roles = {name: f.metadata["role"] for name, f in FIELDS.items()}
    assert set(roles.values()) <= set(ROLES) and fields_with_role(*ROLES) == set(FIELDS)
    neutral = {name for name, role in roles.items() if role != "result"}
    assert RESULT_NEUTRAL_FIELDS == resume_may_change == neutral
    # a search varies result fields alone, and not those that must hold between trials
    assert fields_with_role("result") >= SEARCHABLE_FIELDS
    assert {n for n, f in FIELDS.items() if f.metadata["searchable"]} == SEARCHABLE_FIELDS
    # where or how a run goes, and paths, belong to a machine: each command of a study says its own
    assert fields_with_role("machine") <= LOCAL_FIELDS
    assert {name for name in FIELDS if name.endswith("_dir")} <= LOCAL_FIELDS
    assert fields_with_role("schedule") | LOCAL_FIELDS == PER_COMMAND_FIELDS


def _space_entry(name):
    """A space-file entry for field ``name`` within its declared range."""
    meta, kind = FIELDS[name].metadata, field_type(name)
    if meta["choices"] or kind in (bool, str):
        return {"choices": list(meta["choices"] or [getattr(Config(), name)])}
    low = meta["min"] if meta["min"] is not None else 0
    low += 1 if meta["min_exclusive"] and kind is int else 0.001 if meta["min_exclusive"] else 0
    high = meta["max"] if meta["max"] is not None else low + 10
    return {"type": "int" if kind is int else "float", "low": low, "high": high}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_a_space_may_vary_each_searchable_field_and_no_other(name):
    from jax_mnist.errors import UserError
    from jax_mnist.tune.space import parse_space

    entries = {name: _space_entry(name)}
    if name in SEARCHABLE_FIELDS:
        (param,) = parse_space(entries, Config(), source="space.toml")
        assert param.name == name
    else:
        with pytest.raises(UserError, match=f"space.toml: {name}: not searchable"):
            parse_space(entries, Config(), source="space.toml")


def test_option_refuses_a_role_it_does_not_know_and_a_searchable_non_result_field():
    with pytest.raises(ValueError, match="role must be one of"):
        option(0, "x", role="output")
    with pytest.raises(ValueError, match="cannot be searchable"):
        option(0, "x", role="schedule", searchable=True)
    with pytest.raises(ValueError, match="unknown roles"):
        fields_with_role("output")


# Four steps of a small MLP on 128 images: what a setting changes shows in the first epoch's
# record and in the state (weights and optimizer) saved after it.
MICRO = tiny_config(
    model="mlp", width=16, depth=1, train_size=128, val_size=64, batch_size=32, epochs=1, log_every=1
).replace(eval_batch_size=64)
# Result fields whose effect shows only beside another setting: the reference runs with it too.
CONTEXT = {
    "momentum": {"optimizer": "sgd"},
    "nesterov": {"optimizer": "sgd"},
    "epochs": {"schedule": "cosine"},  # under the constant schedule, more epochs begin alike
}
# Result fields that change what is read, with no other data here to read: the bundled MNIST
# is all there is offline (other datasets download: test_download.py; tfds: test_tfds.py).
READS_OTHER_DATA = {"dataset", "data_dir", "data_source"}
# A preset names values of the other fields (resolve_config applies them; tested above); set
# alone on a Config it is a label.
NAMES_OTHER_FIELDS = {"preset"}
# Result fields kept so because another backend or model may round differently with another
# value (a run resumes only with the values it began with); here they may give the same bits:
# the validation sums are taken in float64, and the MLP's steps are unrolled alike in any chunk.
MAY_ROUND_DIFFERENTLY = {"eval_batch_size", "steps_per_call"}
# Values that show: adamw without weight decay is adam; warm-up and epochs in whole steps.
SPECIAL_VALUES = {"model": "lenet5", "optimizer": "sgd", "warmup_epochs": 0.5, "epochs": 2.0}


def _another(name, config):
    """A valid value of field ``name`` other than ``config``'s."""
    if name in SPECIAL_VALUES:
        return SPECIAL_VALUES[name]
    value, meta, kind = getattr(config, name), FIELDS[name].metadata, field_type(name)
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != value)
    if kind is bool:
        return not value
    if value is None:
        return 1
    if kind is int:
        return value + 1 if meta["max"] is None or value < meta["max"] else value - 1
    return value + 0.01 if meta["max"] is None or value + 0.01 <= meta["max"] else value - 0.01


def _first_epoch(workdir):
    """A run's first epoch record and the whole training state saved at its end."""
    epoch = next(r for r in records_without_timings(workdir) if r["kind"] == "epoch")
    with Checkpoints(workdir, read_only=True) as checkpoints:
        config = checkpoints.read_config()
        setup = train.create_setup(config, steps_per_epoch=1)
        state, _ = checkpoints.restore(train.abstract_train_state(setup), epoch["step"])
    computed = {k: epoch[k] for k in ("step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")}
    return computed, jax.tree.map(np.asarray, state)


def _same_state(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def micro_runs(tmp_path_factory):
    """``context -> its first epoch`` for MICRO with a context's changes, trained on first use."""
    done = {}

    def first_epoch(**changes):
        key = tuple(sorted(changes.items()))
        if key not in done:
            workdir = tmp_path_factory.mktemp("micro") / "run"
            train.train_and_evaluate(MICRO.replace(**changes), workdir, evaluate_test=False)
            done[key] = _first_epoch(workdir)
        return done[key]

    return first_epoch


def test_each_result_field_is_tried_or_said_why_not():
    special = (
        set(CONTEXT) | READS_OTHER_DATA | NAMES_OTHER_FIELDS | MAY_ROUND_DIFFERENTLY | set(SPECIAL_VALUES)
    )
    assert special <= fields_with_role("result")


@pytest.mark.slow
@pytest.mark.long  # a run per field: 30 runs of four steps, about a minute of a worker's time
@pytest.mark.parametrize(
    "name", sorted(fields_with_role("result") - READS_OTHER_DATA - NAMES_OTHER_FIELDS - MAY_ROUND_DIFFERENTLY)
)
def test_each_result_field_changes_what_is_computed(name, micro_runs):
    context = CONTEXT.get(name, {})
    value = _another(name, MICRO.replace(**context))
    epoch, state = micro_runs(**context, **{name: value})
    expected_epoch, expected_state = micro_runs(**context)
    assert epoch != expected_epoch or not _same_state(state, expected_state), f"{name}={value!r}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*sorted(SCHEDULE_ONLY_CHANGES), "epochs"])
def test_fields_that_may_change_on_resume_do_not_change_what_is_computed(name, micro_runs):
    # epochs may change on resume with the constant schedule only (Config.schedule_spans_run).
    value = 2 if name == "epochs" else SCHEDULE_ONLY_CHANGES[name]
    assert value != getattr(MICRO, name)
    epoch, state = micro_runs(**{name: value})
    expected_epoch, expected_state = micro_runs()
    assert epoch == expected_epoch
    assert _same_state(state, expected_state)
