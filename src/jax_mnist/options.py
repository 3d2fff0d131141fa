"""Settings declared once: a settings dataclass's fields made with :func:`option` carry their
flag's help, range and choices and their role, which the CLI (``commands/common.py``), the
checks, resume and tune read. :class:`~jax_mnist.config.Config` and
:class:`~jax_mnist.serve.settings.ServeSettings` are declared this way. Also the reading of
settings files (TOML, YAML, JSON). Light to import: no JAX, no NumPy.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from jax_mnist.errors import UserError

# What a field is, said where it is declared; every set of fields the code needs is computed
# from these (see the sets after :class:`Config`):
#   result    changes what a run computes (the default);
#   schedule  only when a run logs, saves or shows its progress;
#   machine   only where or how it runs, never the numbers it computes.
ROLES = ("result", "schedule", "machine")


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    group: str = "optimization",
    min_exclusive: bool = False,
    role: str = "result",
    searchable: bool | None = None,
    local: bool | None = None,
) -> Any:
    """A config field with the metadata the CLI, :meth:`Config.validate`, resume and tune read.

    Args:
      role: one of :data:`ROLES`: what changing the field changes.
      searchable: whether ``jax-mnist tune`` may vary it. Only ``result`` fields can be, and
        they are unless this says ``False``.
      local: whether its value belongs to the machine a command runs on (a path, the devices),
        so the commands of one study may give different values. ``machine`` fields are.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if searchable and role != "result":
        raise ValueError(f"a {role} field changes nothing a search scores; it cannot be searchable")
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "choices": choices,
        "group": group,
        "min_exclusive": min_exclusive,
        "role": role,
        "searchable": role == "result" if searchable is None else searchable,
        "local": role == "machine" if local is None else local,
    }
    return dataclasses.field(default=default, metadata=meta)


def scalar_type(hint: Any) -> type:
    """The scalar type of a field's annotation (``str | None`` -> ``str``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def read_table_file(path: Path, *, kind: str = "config file", json_ok: bool = True) -> dict[str, Any]:
    """Reads a TOML, YAML (or JSON) file that must hold one table; one-line errors name ``path``.

    Args:
      path: the file; its suffix says the format.
      kind: what the file is, for messages ("config file", "space file").
      json_ok: whether ``.json`` is accepted.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read {kind} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a valid {kind}: not UTF-8 text (byte {e.start})") from None
    import yaml

    suffixes = (".toml", ".yaml", ".yml", ".json") if json_ok else (".toml", ".yaml", ".yml")
    if path.suffix not in suffixes:
        raise UserError(f"{path}: {kind}s must end in {', '.join(suffixes[:-1])} or {suffixes[-1]}")
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            values = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, ValueError, yaml.YAMLError) as e:
        # JSON and TOML errors are ValueErrors; YAML's are not. One line: the first of the message.
        raise UserError(f"{path}: not a valid {kind}: {e}".splitlines()[0]) from None
    except RecursionError:
        raise UserError(f"{path}: not a valid {kind}: nested too deeply") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a {kind} must hold a table of settings")
    return values
