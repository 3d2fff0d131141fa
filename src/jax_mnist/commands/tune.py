"""``jax-mnist tune``: a hyperparameter search with Optuna; the flags of ``train`` fix settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from jax_mnist.commands.common import add_option_flags, given_options
from jax_mnist.config import Config
from jax_mnist.tune.study import PRUNERS, SAMPLERS  # the tune package loads Optuna only when used

NAME = "tune"
HELP = "search hyperparameters on the validation split with Optuna (pip install 'jax-mnist[tune]')"
DESCRIPTION = (
    "Search hyperparameters with Optuna, scored by validation accuracy; the test set is "
    "never read. Every trial is a run directory STUDY/trial-NNNN. Flags of `jax-mnist train` fix "
    "those settings for every trial. Running the same command again continues the study."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--study", type=Path, required=True, metavar="DIR", help="folder of the study and its trials"
    )
    parser.add_argument(
        "--trials", type=int, required=True, metavar="N", help="finish when N trials are complete or pruned"
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="K", help="trial processes on this machine (default: 1)"
    )
    parser.add_argument(
        "--space",
        type=Path,
        metavar="FILE",
        help="TOML or YAML file of the searched settings (default: a built-in space for the model)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage shared by workers on several machines, e.g. "
        "postgresql://user:password@host/db (default: sqlite in DIR/study.db)",
    )
    parser.add_argument(
        "--study-name", metavar="NAME", help="name of the study in the storage (default: DIR's name)"
    )
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="default: tpe")
    parser.add_argument(
        "--pruner",
        choices=PRUNERS,
        default="median",
        help="stop hopeless trials from their per-epoch validation accuracy (default: median)",
    )
    parser.add_argument(
        "--sampler-seed", type=int, default=0, metavar="S", help="seed of the sampler (default: 0)"
    )
    parser.add_argument(
        "--cost-target",
        type=float,
        metavar="ACC",
        help="also minimize the training cost (images x forward FLOPs per image) to first reach this "
        "validation accuracy, e.g. 0.991: a two-objective search with a Pareto front (no pruning)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML, YAML or JSON file of fixed settings; flags override it",
    )
    add_option_flags(parser, Config)  # the flags of train fix those settings for every trial


def run(args: argparse.Namespace) -> int:
    from jax_mnist.tune import make_settings, tune

    flags = given_options(args, Config)
    settings = make_settings(
        args.study,
        args.trials,
        flags,
        config_file=args.config,
        space_file=args.space,
        workers=args.workers,
        storage=args.storage,
        study_name=args.study_name,
        sampler=args.sampler,
        pruner=args.pruner,
        sampler_seed=args.sampler_seed,
        cost_target=args.cost_target,
    )
    tune(settings)
    return 0
