"""``jax-mnist models``: the architectures, their sizes and costs."""

from __future__ import annotations

import argparse

from jax_mnist.commands.common import no_arguments as add_arguments

NAME = "models"
HELP = "list the architectures"
DESCRIPTION = None
__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from jax_mnist.models import MODELS, abstract_model, count_params, flops_per_image

    print(f"{'model':<10} {'parameters':>12} {'MFLOP/image':>12}  description")
    for name, entry in MODELS.items():
        model = abstract_model(name)  # shapes only: nothing is initialized or compiled
        print(
            f"{name:<10} {count_params(model):>12,} {flops_per_image(model) / 1e6:>12.2f}  "
            f"{entry.description}"
        )
    return 0
