"""``jax-mnist export``: a run's model as an ONNX or StableHLO file with its JSON sidecar."""

from __future__ import annotations

import argparse
from pathlib import Path

from jax_mnist.commands.common import add_checkpoint_flag, checkpoint_choice, warn

NAME = "export"
HELP = "export a trained model to ONNX or StableHLO (jax.export), runnable without jax-mnist"
DESCRIPTION = (
    "Write the model of a run as one file that takes raw pixels [N, 28, 28] and "
    "returns logits [N, C] (normalization inside), plus a JSON description beside it "
    "(<out>.json: classes, input contract, source run, test accuracy, SHA-256)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="run directory")
    parser.add_argument(
        "--format",
        required=True,
        metavar="onnx|stablehlo",
        help="ONNX (ONNX Runtime) or a jax.export artifact",
    )
    add_checkpoint_flag(parser, "which checkpoint")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="the file to write (default: RUN/model.onnx or RUN/model.stablehlo)",
    )
    parser.add_argument(
        "--input-dtype",
        default="float32",
        metavar="float32|uint8",
        help="pixels the artifact takes: float32 in [0, 1] or uint8 0-255 (default: float32)",
    )


def run(args: argparse.Namespace) -> int:
    from jax_mnist.export import export_run, sidecar_path

    which = checkpoint_choice(args.checkpoint)
    path = export_run(args.run, args.format, args.out, which=which, input_dtype=args.input_dtype, warn=warn)
    print(path)
    print(sidecar_path(path))
    return 0
