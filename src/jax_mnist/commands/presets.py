"""``jax-mnist presets``: the named presets and what each sets."""

from __future__ import annotations

import argparse

from jax_mnist.commands.common import no_arguments as add_arguments
from jax_mnist.config import PRESETS, Config, flag_name, preset_config

NAME = "presets"
HELP = "list the presets and what they set"
DESCRIPTION = None
__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    default = Config()
    for name, preset in PRESETS.items():
        config = preset_config(name)
        changes = {k: v for k, v in config.to_dict().items() if k != "preset" and v != getattr(default, k)}
        settings = ", ".join(f"{flag_name(k)} {v}" for k, v in changes.items()) or "the defaults"
        summary = (preset.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<6} {summary}\n       sets: {settings}")
    return 0
