"""``jax-mnist evaluate``: test or validation metrics of runs, and of their ensemble."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jax_mnist.commands.common import add_checkpoint_flag, checkpoint_choice, warn

NAME = "evaluate"
HELP = "test metrics of trained runs; several runs are also evaluated as an ensemble"
DESCRIPTION = (
    "Print test loss, accuracy, per-class accuracy and the confusion matrix of "
    "each run, and of their ensemble (averaged probabilities) when several are given."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    add_checkpoint_flag(parser, "which checkpoint of each run")
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluate on the test set, or on the validation images the runs held out (default: test)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average each model over the image and its 1-pixel shifts",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="read the test set from this folder")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    from jax_mnist.evaluate import evaluate_runs, format_metrics

    which = checkpoint_choice(args.checkpoint)
    result = evaluate_runs(
        args.runs, which, split=args.split, tta=args.tta, data_dir=args.data_dir, warn=warn
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    names, split = result["class_names"], result["split"]
    for member in result["members"]:
        print(format_metrics(f"{member['workdir']} (step {member['step']})", member, names, split) + "\n")
    if result["ensemble"] is not None:
        print(format_metrics(f"ensemble of {len(result['members'])}", result["ensemble"], names, split))
        for member in result["members"]:
            print(f"  member {member['workdir']}: {100 * member['accuracy']:.2f}%")
    return 0
