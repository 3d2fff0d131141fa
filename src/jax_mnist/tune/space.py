"""The search space of ``jax-mnist tune``: which :class:`Config` fields a search varies, and how.

A space is a table of field name -> distribution (a space file, TOML or YAML, or the model
family's built-in one); every entry is checked against the ranges of :class:`Config` before
a trial runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

from jax_mnist.config import (
    FIELDS,
    SEARCHABLE_FIELDS,
    Config,
    field_type,
    flag_name,
    normalize_keys,
    read_table_file,
)
from jax_mnist.errors import ConfigError, UserError
from jax_mnist.models import MODELS


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched setting: a :class:`Config` field and its distribution.

    ``kind`` is ``float`` or ``int`` (between ``low`` and ``high``, log-uniform with ``log``,
    on a grid of ``step``) or ``categorical`` (one of ``choices``).
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            assert self.low is not None and self.high is not None  # parse_space gives ints bounds
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        value = trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {list(self.choices)}"
        extra = ", log" if self.log else (f", step {self.step}" if self.step is not None else "")
        return f"{self.name} {self.kind} [{self.low}, {self.high}{extra}]"


def _common_space() -> dict[str, dict[str, Any]]:
    return {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.6},
        "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
        "aug_shift": {"type": "float", "low": 0.0, "high": 3.0},
        "aug_rotate": {"type": "float", "low": 0.0, "high": 15.0},
        "aug_scale": {"type": "float", "low": 0.0, "high": 0.15},
        "epochs": {"type": "int", "low": 4, "high": 16},
    }


def default_space(model: str) -> dict[str, dict[str, Any]]:
    """The built-in space of a model family, as the entries of a space file: the settings every
    model shares and the model's own (its registry entry's ``tune_space``: width, depth)."""
    own = MODELS[model].tune_space if model in MODELS else {}
    return {**_common_space(), **copy.deepcopy(own)}


def read_space_file(path: Path) -> dict[str, Any]:
    """The raw entries of a TOML or YAML space file."""
    return read_table_file(path, kind="space file", json_ok=False)


def parse_space(entries: dict[str, Any], base: Config, *, source: str) -> list[Param]:
    """Checks the entries of a space (field name -> distribution) against ``base`` and the
    ranges of :class:`Config`; a one-line :class:`UserError` names ``source`` and the entry."""
    params = []
    for key, spec in entries.items():
        name = str(key).replace("-", "_")
        where = f"{source}: {key}"
        if name not in FIELDS:
            raise UserError(f"{where}: unknown setting; the entries are fields of `jax-mnist train --help`")
        # Each field says whether a search may vary it (``option(searchable=...)`` in config.py):
        # not those that change which images validate (trials would be scored on different
        # sets), what is trained on, or only where and how a run goes.
        if name not in SEARCHABLE_FIELDS:
            raise UserError(
                f"{where}: not searchable (it changes the validation images or only the output); "
                f"fix it with {flag_name(name)} instead"
            )
        if not isinstance(spec, dict):
            raise UserError(f'{where}: must be a table such as {{type = "float", low = 0.0, high = 1.0}}')
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise UserError(
                f"{where}: unknown key {sorted(unknown)[0]!r}; use type, low, high, log, step or choices"
            )
        params.append(_parse_entry(name, spec, base, where))
    return params


def _check_value(base: Config, name: str, value: Any, where: str) -> Any:
    """``value`` as the field's type, checked by :meth:`Config.validate`."""
    try:
        value = normalize_keys({name: value}, source=where)[name]
        base.replace(**{name: value}).validate()
    except ConfigError as e:
        raise UserError(f"{where}: {value!r} is out of range: {e}") from None
    except UserError as e:
        raise UserError(str(e)) from None
    return value


def _parse_entry(name: str, spec: dict[str, Any], base: Config, where: str) -> Param:
    kind = field_type(name)
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise UserError(f"{where}: choices cannot be combined with type, low, high, log or step")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list")
        return Param(name, "categorical", choices=tuple(_check_value(base, name, c, where) for c in choices))
    dist = spec.get("type")
    if dist not in ("float", "int"):
        raise UserError(f'{where}: needs type = "float" or "int" with low and high, or a list of choices')
    if kind not in (float, int):
        raise UserError(f"{where}: a {kind.__name__} setting is searched with choices, not a {dist} range")
    if kind is int and dist == "float":
        raise UserError(f'{where}: {name} is a whole number; use type = "int"')
    bounds = {}
    for bound in ("low", "high"):
        value = spec.get(bound)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"{where}: {bound} must be a finite number, got {value!r}")
        if dist == "int" and value != int(value):
            raise UserError(f'{where}: {bound} must be a whole number for type = "int", got {value!r}')
        bounds[bound] = int(value) if dist == "int" else float(value)
        _check_value(base, name, kind(bounds[bound]), where)
    low, high = bounds["low"], bounds["high"]
    if not low < high:
        raise UserError(f"{where}: low ({low}) must be less than high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise UserError(f"{where}: a log-uniform range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or not step > 0:
            raise UserError(f"{where}: step must be a positive number, got {step!r}")
        if log:
            raise UserError(f"{where}: step and log cannot be combined")
        step = int(step) if dist == "int" else float(step)
    return Param(name, dist, low, high, log, step)


def build_space(space_file: Path | None, base: Config, fixed: set[str]) -> list[Param]:
    """The searched settings: a space file's, or the model family's default space less the
    settings fixed by flags. A space file entry that a flag also fixes is an error."""
    if space_file is not None:
        params = parse_space(read_space_file(space_file), base, source=str(space_file))
        for p in params:
            if p.name in fixed:
                raise UserError(
                    f"{space_file}: {p.name}: also fixed by {flag_name(p.name)}; drop the flag or the entry"
                )
    else:
        entries = {k: v for k, v in default_space(base.model).items() if k not in fixed}
        params = parse_space(entries, base, source=f"default space of {base.model}")
    if not params:
        raise UserError("nothing to search: every setting of the space is fixed by a flag")
    return params


def short_value(value: Any) -> str:
    """A value as a table shows it: floats to 3 significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_params(params: dict[str, Any]) -> str:
    """``name=value, ...`` of a trial's parameters."""
    return ", ".join(f"{k}={short_value(v)}" for k, v in params.items())
