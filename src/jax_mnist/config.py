"""One typed config for a training run, its presets, and the checks on its values.

Every field is declared with :func:`~jax_mnist.options.option` and becomes a command-line flag
(``batch_size`` -> ``--batch-size``) with its help text and range taken from the field's
metadata, so this file is the single place where a hyperparameter is declared. A field also says its role (:data:`ROLES`: whether it changes what
a run computes), whether a search may vary it and whether its value belongs to one machine;
what a resumed run may change and what ``jax-mnist tune`` may search are computed from that
(:func:`fields_with_role`, :data:`RESULT_NEUTRAL_FIELDS`, :data:`SEARCHABLE_FIELDS`,
:data:`LOCAL_FIELDS`). A config is written as JSON into every run directory and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

from jax_mnist.errors import ConfigError, UserError
from jax_mnist.models import COMPUTE_DTYPES  # the registry imports no JAX
from jax_mnist.options import ROLES, flag_name, option, read_table_file, scalar_type

# How a run shows its progress on the console (``--progress``; ``logs.use_progress_bar``).
PROGRESS_MODES = ("auto", "bar", "plain")


@dataclasses.dataclass(frozen=True)
class Config:
    """All the settings of a training run. Defaults are the seed's (``--preset seed``)."""

    # -- what to train
    preset: str = option(
        "seed",
        "named preset the other flags start from (see `jax-mnist presets`)",
        group="what to train",
        searchable=False,  # it names where the other settings started, not a setting of its own
    )
    model: str = option("cnn", "architecture (see `jax-mnist models`)", group="what to train")
    width: int = option(
        0,
        "base width of the model (channels or units); 0 keeps the model's default",
        min=0,
        group="what to train",
    )
    depth: int = option(
        0, "depth of the model (blocks or layers); 0 keeps the model's default", min=0, group="what to train"
    )
    dropout: float = option(
        0.5,
        "dropout rate before the classifier, active only in training",
        min=0.0,
        max=0.95,
        group="what to train",
    )

    # -- data
    # A search varies none of the data settings that follow but --train-size: they choose which
    # images train and which validate, and trials scored on different images do not compare.
    dataset: str = option(
        "mnist", "dataset to train on (see `jax-mnist datasets`)", group="data", searchable=False
    )
    data_dir: str | None = option(
        None,
        "folder with the dataset's four IDX files (gzipped or not) to use instead of the bundled copy",
        group="data",
        searchable=False,
        local=True,  # a path on this machine, though what it holds is trained on
    )
    data_source: str = option(
        "idx",
        "where the images come from: idx reads IDX files (bundled MNIST, --data-dir, or downloaded "
        "into --cache-dir); tfds loads them through tensorflow_datasets (pip install 'jax-mnist[tfds]')",
        choices=("idx", "tfds"),
        group="data",
        searchable=False,
    )
    cache_dir: str | None = option(
        None,
        "folder that downloaded datasets are kept in (default: the user cache folder, "
        "e.g. ~/.cache/jax-mnist on Linux)",
        group="data",
        role="machine",
    )
    tfds_data_dir: str | None = option(
        None,
        "tensorflow_datasets data folder for --data-source tfds (default: tfds' own, ~/tensorflow_datasets)",
        group="data",
        role="machine",
    )
    val_size: int = option(
        5000,
        "training examples held out for validation, chosen from --seed; 0 trains on the whole training set",
        min=0,
        group="data",
        searchable=False,
    )
    val_seed: int | None = option(
        None,
        "seed that chooses the validation images; runs with different --seed but the same --val-seed "
        "hold out the same images (for ensembles and searches scored on them); default: --seed",
        min=0,
        group="data",
        searchable=False,
    )
    train_size: int = option(
        0,
        "train on only the first this many examples left after the "
        "validation split, for quick experiments; 0 uses them all",
        min=0,
        group="data",
    )

    # -- optimization
    epochs: float = option(
        5.0,
        "passes over the training data; a fraction ends the run part way through the last one "
        "(1.5: one epoch and half of the next)",
        min=0.0,
        min_exclusive=True,
        max=10_000.0,  # the steps are int32 counters on the device: at most 600 million here
    )
    batch_size: int = option(128, "examples per training step (global, across all devices)", min=1)
    lr: float = option(1e-3, "peak learning rate", min=0.0, min_exclusive=True)
    optimizer: str = option(
        "adam",
        "optimizer (sgd uses --momentum and --nesterov, adam and adamw --b1 and --b2)",
        choices=("adam", "adamw", "sgd", "rmsprop", "lion"),
    )
    momentum: float = option(0.9, "momentum of sgd and rmsprop", min=0.0, max=0.999)
    b1: float = option(0.9, "decay of the mean of the gradients in adam and adamw", min=0.0, max=0.999)
    b2: float = option(
        0.999, "decay of the mean of the squared gradients in adam and adamw", min=0.0, max=0.9999
    )
    nesterov: bool = option(False, "Nesterov momentum for sgd")
    weight_decay: float = option(
        0.0, "decoupled weight decay (adamw, lion) or L2 added to the gradient (others)", min=0.0
    )
    schedule: str = option(
        "constant",
        "learning-rate schedule over the whole run",
        choices=("constant", "cosine", "onecycle", "step"),
    )
    warmup_epochs: float = option(0.0, "linear warmup from 0 to --lr, in epochs (constant, cosine)", min=0.0)
    grad_clip: float = option(0.0, "clip gradients to this global norm; 0 turns clipping off", min=0.0)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy targets", min=0.0, max=0.5)
    ema_decay: float = option(
        0.0,
        "evaluate an exponential moving average of the weights with this decay (e.g. 0.999), ramped up "
        "from 0.1 over the first steps; 0 turns it off",
        min=0.0,
        max=0.99999,
    )
    seed: int = option(
        0,
        "seed for initialization, validation split, data order and dropout",
        min=0,
        searchable=False,  # it chooses the validation images too (unless --val-seed is set)
    )

    # -- augmentation, on the device inside the training step
    aug_shift: float = option(
        0.0, "random shift of up to this many pixels", min=0.0, max=8.0, group="augmentation"
    )
    aug_rotate: float = option(
        0.0, "random rotation of up to this many degrees", min=0.0, max=45.0, group="augmentation"
    )
    aug_scale: float = option(
        0.0, "random zoom by a factor in [1 - s, 1 + s]", min=0.0, max=0.5, group="augmentation"
    )
    aug_elastic: float = option(
        0.0, "strength (pixels) of elastic distortion; 0 turns it off", min=0.0, max=8.0, group="augmentation"
    )

    # -- running
    # Results do not depend on the number of devices (the global batch is split among them).
    devices: int = option(
        0, "devices to train on, data parallel; 0 uses all", min=0, group="devices", role="machine"
    )
    dtype: str = option(
        "float32",
        "compute dtype; bfloat16 keeps float32 master weights",
        choices=COMPUTE_DTYPES,
        group="devices",
    )
    steps_per_call: int = option(
        4,
        "training steps per device call, looped on the device (unrolled for models that loop "
        "slowly on XLA:CPU); more amortize the call, the rest of a chunk runs one step per call",
        min=1,
        max=1000,
        group="devices",
    )
    deterministic: bool = option(
        True,
        "the same bits from the same settings on a GPU too: adds --xla_gpu_deterministic_ops=true "
        "to XLA_FLAGS (XLA:CPU is deterministic already)",
        group="devices",
        # Deterministic GPU kernels change only the order of additions (float32 rounding).
        role="machine",
    )
    compilation_cache: bool = option(
        True,
        "keep compiled programs in <cache folder>/xla (private to the user) and load them in later "
        "runs; JAX_COMPILATION_CACHE_DIR picks another folder, JAX_MNIST_COMPILATION_CACHE=0 turns it off",
        group="devices",
        role="machine",  # only where compiled programs come from
    )
    log_every: int = option(
        100, "print the training loss every this many steps", min=1, group="output", role="schedule"
    )
    checkpoint_every: int = option(
        1, "save a checkpoint every this many epochs", min=1, group="output", role="schedule"
    )
    checkpoint_every_steps: int = option(
        0,
        "also save every this many steps; 0 saves only at epoch ends",
        min=0,
        group="output",
        role="schedule",
    )
    keep: int = option(
        3,
        "latest checkpoints to keep (the best one is kept separately)",
        min=1,
        group="output",
        role="schedule",
    )
    # Left a result field: a run resumes only with the evaluation batches it started with
    # (sums over other batches may round differently). A search has no reason to vary it.
    eval_batch_size: int = option(
        1000,
        "examples per evaluation batch (memory, not results)",
        min=1,
        group="output",
        searchable=False,
    )
    progress: str = option(
        "auto",
        "console output: a live bar per epoch (bar), plain lines (plain), or a bar on a terminal only (auto)",
        choices=PROGRESS_MODES,
        group="output",
        role="schedule",
    )
    tensorboard: bool = option(
        True, "write TensorBoard event files into the run directory", group="output", role="schedule"
    )

    @property
    def schedule_spans_run(self) -> bool:
        """Whether the learning rate at a step depends on the run's length (``epochs``)."""
        return self.schedule != "constant"

    def total_steps(self, steps_per_epoch: int) -> int:
        """Training steps of the whole run: ``epochs`` passes of ``steps_per_epoch``, at least one."""
        return max(1, round(self.epochs * steps_per_epoch))

    @property
    def validation_seed(self) -> int:
        """The seed that chooses the validation images: ``val_seed``, or ``seed`` when not set."""
        return self.seed if self.val_seed is None else self.val_seed

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> Config:
        """Builds a config from ``values`` on top of the preset they name (or the seed's)."""
        values = normalize_keys(values, source=source)
        base = preset_config(values.get("preset", "seed"))
        return base.replace(**values)

    def validate(self) -> Config:
        """Checks every value; raises :class:`ConfigError` naming the flag. Returns self."""
        from jax_mnist.data.datasets import DATASETS
        from jax_mnist.models import MODELS

        for f in dataclasses.fields(self):
            value, meta, flag = getattr(self, f.name), f.metadata, flag_name(f.name)
            if value is None:
                continue
            low = meta["min"]
            if low is not None and (value < low or (meta["min_exclusive"] and value == low)):
                bound = f"greater than {low}" if meta["min_exclusive"] else f"at least {low}"
                raise ConfigError(flag, f"must be {bound}, got {value}")
            if meta["max"] is not None and value > meta["max"]:
                raise ConfigError(flag, f"must be at most {meta['max']}, got {value}")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
                raise ConfigError(flag, f"must be at most {MAX_INT}, got {_digits(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(flag, f"must be a finite number, got {value}")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ConfigError(flag, f"must be one of {', '.join(meta['choices'])}; got {value!r}")
        if self.preset not in PRESETS:
            raise ConfigError("--preset", f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.model not in MODELS:
            raise ConfigError("--model", f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ConfigError(
                "--dataset", f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}"
            )
        return self

    def check_against_data(self, num_train_examples: int) -> None:
        """Checks the values that depend on the size of the training set."""
        if self.val_size >= num_train_examples:
            raise ConfigError(
                "--val-size",
                f"must be smaller than the training set ({num_train_examples} examples), got {self.val_size}",
            )
        available = num_train_examples - self.val_size
        if self.train_size > available:
            raise ConfigError(
                "--train-size",
                f"must be at most the {available} training examples "
                f"left after the validation split, got {self.train_size}",
            )
        if self.batch_size > (self.train_size or available):
            raise ConfigError(
                "--batch-size",
                f"must be at most the number of training examples "
                f"({self.train_size or available}), "
                f"got {self.batch_size}",
            )


# Integer settings become int32 counters and shapes on the device.
MAX_INT = 2**31 - 1


def _digits(value: int) -> str:
    """A huge integer named by its size (Python refuses to print those of over 4,300 digits)."""
    if abs(value) < 10**18:
        return str(value)
    return f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def fields_with_role(*roles: str) -> frozenset[str]:
    """The names of the fields whose role (see :data:`ROLES`) is one of ``roles``."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; the roles are {ROLES}")
    return frozenset(name for name, f in FIELDS.items() if f.metadata["role"] in roles)


# The sets the code needs, computed from what each field says of itself.
# Fields that never change what a run computes: a run may resume with other values of them.
RESULT_NEUTRAL_FIELDS = fields_with_role("schedule", "machine")
# Fields that ``jax-mnist tune`` may vary.
SEARCHABLE_FIELDS = frozenset(name for name, f in FIELDS.items() if f.metadata["searchable"])
# Fields whose values belong to the machine a command runs on (paths, devices).
LOCAL_FIELDS = frozenset(name for name, f in FIELDS.items() if f.metadata["local"])


FIELD_TYPES = typing.get_type_hints(Config)


def field_type(name: str) -> type:
    """The scalar type of field ``name`` (``str | None`` -> ``str``)."""
    return scalar_type(FIELD_TYPES[name])


def normalize_keys(values: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Maps ``batch-size`` style keys to field names and checks value types.

    Unknown keys and values of the wrong type are rejected with a line naming them.
    """
    out = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise UserError(f"{source}: setting names are text, got {key!r}")
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"{source}: unknown setting {key!r}; see `jax-mnist train --help`")
        kind = field_type(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise UserError(f"{source}: {key} is too large, got {_digits(value)}") from None
        if value is not None and (type(value) is not kind):
            raise UserError(f"{source}: {key} must be of type {kind.__name__}, got {value!r}")
        out[name] = value
    return out


def load_config_file(path: Path) -> dict[str, Any]:
    """Reads a TOML, YAML or JSON config file into a dict of settings (not yet merged)."""
    return normalize_keys(read_table_file(path), source=str(path))


def resolve_config(
    flags: dict[str, Any], config_file: Path | None = None, stored: Config | None = None
) -> Config:
    """The config of a run from what the user gave.

    Args:
      flags: settings given on the command line (only those given).
      config_file: a TOML/YAML/JSON file of settings; flags override it.
      stored: the config of the run being resumed, if any. Without a ``preset`` among the
        given settings, the run continues from the stored config with the given changes.

    Returns:
      The config, not yet validated.
    """
    values = load_config_file(config_file) if config_file is not None else {}
    values.update(normalize_keys(flags, source="command line"))
    if stored is not None and "preset" not in values:
        return stored.replace(**values)
    return Config.from_dict(values)


# -- presets: functions returning a full config; flags given after --preset override them.


def seed() -> Config:
    """The seed script's pipeline: the 2-conv CNN, Adam 1e-3, batch 128, 5 epochs."""
    return Config()


def fast() -> Config:
    """The least wall time to 99% test accuracy on a CPU: the seed CNN at half width, 4 epochs, one-cycle."""
    # Chosen on the validation split (--val-size 5000). One-cycle to 3e-3 brings the seed CNN
    # to 99.04% in 3 epochs (2 epochs: 98.62%), where a constant 1e-3 needs 5 epochs for
    # 98.88%. At half width (convolutions of 16 and 32 channels, 3.3x fewer FLOPs) it trains
    # 2.2x faster and reaches 99.06% in 4 epochs (3 epochs: 98.92%). The whole training set
    # is used since there is nothing to select on a validation split.
    return Config(width=16, epochs=4.0, schedule="onecycle", lr=3e-3, val_size=0)


def speedrun() -> Config:
    """The fewest training FLOPs to 99.1% validation accuracy: the speed runs' small CNN with batch norm, 1.4 epochs."""
    # Chosen by `jax-mnist tune --cost-target 0.991` (benchmarks/speedrun_space.toml, 64 trials
    # on the validation split): trial 44 (lr 0.01225) reached 99.10% on the 5,000 validation
    # images after 321 steps (1.5 epochs of the other 55,000), at 240 GFLOP, the cheapest of the
    # trials that got there (the next: 515 GFLOP). The preset takes 322 steps over all 60,000.
    return Config(
        model="smallcnn_bn",  # conv 24 (5x5) - pool - conv 32 (3x3) - pool - conv 32 (3x3), batch norm
        width=24,
        depth=3,
        dropout=0.0,
        batch_size=256,
        lr=0.0123,
        schedule="onecycle",
        epochs=1.375,  # 322 steps of 256 over 60,000 images: the trial's 321 over 55,000
        val_size=0,
    )


def best() -> Config:
    """The highest single-model accuracy: a batch-normalized VGG with augmentation."""
    return Config(
        model="vgg",  # 3 stages of 2 x (conv 3x3 - batch norm - ReLU), 32/64/128 channels
        dropout=0.3,
        epochs=12.0,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=5e-4,  # decoupled, on kernels only
        schedule="onecycle",  # warm up then anneal: the last epochs settle into a minimum
        label_smoothing=0.1,  # calibrated, less overconfident logits; helps ensembles too
        # No weight EMA: with its batch statistics averaged too, EMA leads early (validation
        # 97.50% against 94.70% after one epoch of a 4-epoch trial) but not once one-cycle has
        # annealed the rate (99.06% against 99.08% at the end); see docs/models-and-presets.md.
        aug_shift=2.0,  # MNIST digits vary in position, slant and size by about this much
        aug_rotate=10.0,
        aug_scale=0.1,
    )


PRESETS = {"seed": seed, "fast": fast, "speedrun": speedrun, "best": best}


def preset_config(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError("--preset", f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]().replace(preset=name)
