"""``jax-mnist serve``: every option but ``--checkpoint`` is a field of
:class:`jax_mnist.serve.settings.ServeSettings`."""

from __future__ import annotations

import argparse
from pathlib import Path

from jax_mnist.commands.common import (
    add_checkpoint_flag,
    add_option_flags,
    checkpoint_choice,
    given_options,
    warn,
)
from jax_mnist.serve.settings import ServeSettings  # light: no FastAPI, no JAX

NAME = "serve"
HELP = "a draw-a-digit page and an HTTP API for a trained model"
DESCRIPTION = (
    "Serve a trained model: a page to draw or upload digits at /, the HTTP API "
    "POST /api/predict and GET /api/model, its docs at /docs; /healthz, /readyz and /metrics for "
    "operators. Needs: pip install 'jax-mnist[serve]'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", type=Path, metavar="RUN|EXPORTED_FILE", help="a run directory or an exported model file"
    )
    add_checkpoint_flag(parser, "which checkpoint of a run", default=None)
    add_option_flags(parser, ServeSettings)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The settings given on the command line, not yet validated (:func:`~jax_mnist.serve.serve` does)."""
    which = None if args.checkpoint is None else checkpoint_choice(args.checkpoint)
    return ServeSettings(**given_options(args, ServeSettings), checkpoint=which)


def run(args: argparse.Namespace) -> int:
    from jax_mnist.serve import serve

    serve(args.model, settings_from_args(args), warn=warn)
    return 0
