"""``jax-mnist download``: a dataset's files into the cache, verified."""

from __future__ import annotations

import argparse

from jax_mnist.errors import UserError

NAME = "download"
HELP = "download a dataset into the cache and verify it (training downloads it too)"
DESCRIPTION = (
    "Download a dataset's files from their official location (or $JAX_MNIST_MIRROR) "
    "into the cache, resuming a partial download, and check their SHA-256."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="a dataset from `jax-mnist datasets`")
    parser.add_argument("--cache-dir", metavar="DIR", help="the download cache (default: user cache folder)")


def run(args: argparse.Namespace) -> int:
    from jax_mnist.data.datasets import DATASETS
    from jax_mnist.data.download import fetch_dataset

    if args.name not in DATASETS:
        raise UserError(f"unknown dataset {args.name!r}; choose from {', '.join(DATASETS)}")
    print(fetch_dataset(DATASETS[args.name], args.cache_dir))
    return 0
