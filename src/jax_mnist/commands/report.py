"""``jax-mnist report``: figures and an HTML page of runs, and their comparison."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "report"
HELP = "figures and an HTML page of runs; several runs are also compared on one chart"
DESCRIPTION = (
    "Write into each run directory curves.png, confusion.png, mistakes.png and "
    "a self-contained report.html. With several runs, also write comparison.png and "
    "comparison.html into --out."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where the comparison of several runs goes (default: the directory holding the runs)",
    )


def run(args: argparse.Namespace) -> int:
    from jax_mnist.report import compare_runs, write_report

    for run_dir in args.runs:
        for path in write_report(run_dir):
            print(path)
    if len(args.runs) > 1:
        for path in compare_runs(args.runs, args.out):
            print(path)
    return 0
