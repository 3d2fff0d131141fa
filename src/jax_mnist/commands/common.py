"""What several subcommands share: flags generated from a settings dataclass, the checkpoint
and multi-process flags, and how a handler warns or gives up.

Light to import (no JAX, no NumPy), like every module of :mod:`jax_mnist.commands`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any

from jax_mnist.errors import ConfigError, UserError
from jax_mnist.options import flag_name, scalar_type


def option_fields(settings_class: type) -> list[dataclasses.Field]:
    """The fields of ``settings_class`` declared with :func:`jax_mnist.options.option`: its flags."""
    return [f for f in dataclasses.fields(settings_class) if "help" in f.metadata]


def add_option_flags(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """Adds one flag per field of ``settings_class`` declared with :func:`jax_mnist.options.option`.

    ``field_name`` becomes ``--field-name``; its help is the option's help and its default; a
    bool is ``--name/--no-name``; choices are its metavar, and a ``metavar`` in the metadata
    overrides the last word of the name. Fields of a named ``group`` are listed under it, the
    others (group ``""``) among the command's own options. Defaults are suppressed, so that
    :func:`given_options` knows what was given; the settings class checks the values.
    """
    hints = typing.get_type_hints(settings_class)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in option_fields(settings_class):
        meta = field.metadata
        group: argparse._ActionsContainer = parser
        if meta["group"]:
            group = groups.get(meta["group"]) or groups.setdefault(
                meta["group"], parser.add_argument_group(meta["group"])
            )
        kind = scalar_type(hints[field.name])
        help_text = f"{meta['help']} (default: {field.default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": field.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = meta.get("metavar") or (
                "|".join(meta["choices"]) if meta["choices"] else field.name.split("_")[-1].upper()
            )
        group.add_argument(flag_name(field.name), **kwargs)


def given_options(args: argparse.Namespace, settings_class: type) -> dict[str, Any]:
    """The fields of ``settings_class`` given on the command line, by name."""
    return {f.name: getattr(args, f.name) for f in option_fields(settings_class) if hasattr(args, f.name)}


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that join this process to a multi-process run. They are not config fields:
    they differ between the processes of one run and are neither saved nor compared on resume."""
    group = parser.add_argument_group(
        "processes", "several processes or machines in one run (docs/distributed.md)"
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0, which every process connects to"
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run, detecting what is not given from the cluster "
        "(SLURM, Open MPI, Kubernetes, Cloud TPU)",
    )
    group.add_argument(
        "--coordinator-timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="give up if not every process has joined within this time (default: 300)",
    )


def add_checkpoint_flag(parser: argparse.ArgumentParser, what: str, default: str | None = "best") -> None:
    """``--checkpoint latest|best|STEP``, checked by :func:`checkpoint_choice` when used."""
    parser.add_argument(
        "--checkpoint",
        default=default,
        metavar="latest|best|STEP",
        help=f"{what} (default: best by validation accuracy)",
    )


def checkpoint_choice(value: str) -> str | int:
    """The value of ``--checkpoint``: ``latest``, ``best`` or a step number."""
    if value in ("latest", "best"):
        return value
    if value.isdigit():
        return int(value)
    raise ConfigError("--checkpoint", f"must be latest, best or a step number, got {value!r}")


def warn(message: str) -> None:
    """A warning for the user, on stderr."""
    print(message, file=sys.stderr)


def exit_with_error(message: str) -> None:
    """Ends the process at once with ``message`` as its one-line error."""
    # Called from a watchdog thread while JAX waits in C++: no exception can reach main().
    print(f"jax-mnist: error: {message}", file=sys.stderr, flush=True)
    os._exit(UserError.exit_code)


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """For the subcommands that take none (models, presets)."""
