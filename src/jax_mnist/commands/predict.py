"""``jax-mnist predict``: the digit in image files or ``.npy`` arrays."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jax_mnist.commands.common import add_checkpoint_flag, checkpoint_choice, warn
from jax_mnist.errors import ConfigError

NAME = "predict"
HELP = "predict the digit in image files or .npy arrays"
DESCRIPTION = (
    "Predict the class of each input. Images of any size and either polarity are "
    "brought to MNIST's form first (grayscale, white on black, fitted in 20x20, "
    "centred by centre of mass in 28x28)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="run directory")
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="image files (PNG, JPEG, ...) or .npy arrays [H, W] or [N, H, W]",
    )
    add_checkpoint_flag(parser, "which checkpoint")
    parser.add_argument("--top", type=int, default=1, metavar="K", help="show the K most likely classes")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    from jax_mnist.predict import predict_files

    if args.top < 1:
        raise ConfigError("--top", f"must be at least 1, got {args.top}")
    predictions, errors = predict_files(
        args.run, args.inputs, which=checkpoint_choice(args.checkpoint), top=args.top, warn=warn
    )
    if args.json:
        print(json.dumps({"predictions": predictions, "errors": errors}, indent=2))
    else:
        for p in predictions:
            best = ", ".join(f"{label} ({100 * prob:.1f}%)" for label, prob in p["top"])
            print(f"{p['input']}: {best}")
    for line in errors:
        print(f"jax-mnist: error: {line}", file=sys.stderr)
    return 1 if errors else 0
