"""``jax-mnist train``: every flag is a field of :class:`jax_mnist.config.Config`."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from jax_mnist.commands.common import (
    add_distributed_flags,
    add_option_flags,
    exit_with_error,
    given_options,
    warn,
)
from jax_mnist.config import Config, load_config_file
from jax_mnist.errors import UserError

NAME = "train"
HELP = "train a model (the seed CNN by default)"
DESCRIPTION = "Train a model. Every flag overrides the preset."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML, YAML or JSON file of settings; flags override it"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="run directory for config, metrics and checkpoints; an existing "
        "one with checkpoints resumes (default: runs/<timestamp>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from the latest checkpoint in --workdir (an error if none)",
    )
    add_option_flags(parser, Config)
    add_distributed_flags(parser)


def run(args: argparse.Namespace) -> int:
    from jax_mnist.resume import may_hold_checkpoints, resolve_run
    from jax_mnist.rundir import TRAIN_HOLDER, TRAIN_LOCK, check_can_write
    from jax_mnist.runtime import use_deterministic_ops

    if args.resume and not args.workdir:
        raise UserError("--resume: give the run directory to resume with --workdir DIR")
    flags = given_options(args, Config)
    workdir = args.workdir or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    # A new run's config comes from the flags, the config file and the preset alone: settle it
    # now, so that a bad flag or config file is refused in a fraction of a second, before JAX
    # starts (a run to resume is read from its checkpoints, after JAX is set up below).
    if args.process_id in (None, 0):  # process 0 writes, and holds the run's lock
        check_can_write(workdir, TRAIN_LOCK, TRAIN_HOLDER)  # before JAX starts: refused at once
    config = None
    if not may_hold_checkpoints(workdir):
        config = resolve_run(workdir, flags, config_file=args.config, resume=args.resume)
    # XLA reads XLA_FLAGS when JAX starts its backend, which reading a stored run does: so
    # from the flags and the config file, before that (a resumed run's stored setting
    # cannot turn it off; it only makes the GPU kernels deterministic).
    deterministic = getattr(args, "deterministic", None)
    if deterministic is None and args.config is not None:
        deterministic = load_config_file(args.config).get("deterministic")
    if deterministic is not False:
        use_deterministic_ops(warn=warn)
    from jax_mnist.parallel import DistributedSettings, initialize_distributed
    from jax_mnist.train import train_and_evaluate

    # Then, before anything (Orbax included) touches a device.
    distributed = DistributedSettings(
        args.coordinator, args.num_processes, args.process_id, args.distributed, args.coordinator_timeout
    )
    if distributed.requested and args.workdir is None:
        raise UserError("--workdir: a multi-process run needs a run directory that every process sees")
    initialize_distributed(distributed, on_timeout=exit_with_error)
    if config is None:
        config = resolve_run(workdir, flags, config_file=args.config, resume=args.resume)
    train_and_evaluate(config, workdir, resume=args.resume)
    return 0
