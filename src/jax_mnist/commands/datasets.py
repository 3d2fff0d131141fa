"""``jax-mnist datasets``: the datasets, their sizes and whether each is cached."""

from __future__ import annotations

import argparse

NAME = "datasets"
HELP = "list the datasets, their sizes and whether each is cached"
DESCRIPTION = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR", help="the download cache (default: user cache folder)")
    parser.add_argument(
        "--files", action="store_true", help="list each file to download: URL, size, cache path, SHA-256"
    )


def run(args: argparse.Namespace) -> int:
    from jax_mnist.data.download import describe, format_datasets, format_files, resolve_cache_dir

    if args.files:
        print(format_files(args.cache_dir))
        return 0
    print(f"cache: {resolve_cache_dir(args.cache_dir)}\n{format_datasets(describe(args.cache_dir))}")
    return 0
