"""``jax-mnist runs``: the runs under a directory with their results."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "runs"
HELP = "list the runs under a directory with their results"
DESCRIPTION = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "root", nargs="?", type=Path, default=Path("runs"), metavar="DIR", help="default: runs"
    )


def run(args: argparse.Namespace) -> int:
    from jax_mnist.runs import format_runs, summarize_runs

    summaries = summarize_runs(args.root)
    print(format_runs(summaries, args.root) if summaries else f"no runs under {args.root}")
    return 0
