"""The ``jax-mnist`` command: parses arguments and dispatches to library functions.

Every subcommand is one row of :data:`COMMANDS`: its name and help line, the function that
adds its arguments (here), and its handler (:mod:`jax_mnist.commands`), which calls the
library. Every flag of ``jax-mnist train`` is generated from a field of
:class:`jax_mnist.config.Config`. Importing this module imports neither JAX nor NumPy, so
``--help`` and the light commands start at once; the handlers import what they use.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from jax_mnist import __version__, commands
from jax_mnist.config import Config, field_type, flag_name
from jax_mnist.errors import UserError, WriteError, write_failure
from jax_mnist.serve import ENGINES as SERVE_ENGINES  # the serve package imports nothing heavy
from jax_mnist.tune.study import PRUNERS, SAMPLERS  # neither does the tune package


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per config field. Defaults are suppressed so we know what was given."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(Config):
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], parser.add_argument_group(meta["group"])
        )
        kind = field_type(field.name)
        help_text = f"{meta['help']} (default: {field.default})"
        kwargs = {"default": argparse.SUPPRESS, "help": help_text, "dest": field.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = (
                "|".join(meta["choices"]) if meta["choices"] else field.name.split("_")[-1].upper()
            )
        group.add_argument(flag_name(field.name), **kwargs)


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that join this process to a multi-process run. They are not config fields:
    they differ between the processes of one run and are neither saved nor compared on resume."""
    group = parser.add_argument_group(
        "processes", "several processes or machines in one run (docs/distributed.md)"
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0, which every process connects to"
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run, detecting what is not given from the cluster "
        "(SLURM, Open MPI, Kubernetes, Cloud TPU)",
    )
    group.add_argument(
        "--coordinator-timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="give up if not every process has joined within this time (default: 300)",
    )


def add_checkpoint_flag(parser: argparse.ArgumentParser, what: str, default: str | None = "best") -> None:
    """``--checkpoint latest|best|STEP``, checked by :func:`_checkpoint_choice` when used."""
    parser.add_argument(
        "--checkpoint",
        default=default,
        metavar="latest|best|STEP",
        help=f"{what} (default: best by validation accuracy)",
    )


# -- each subcommand's arguments


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_config_flags(parser)
    add_distributed_flags(parser)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_datasets_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR", help="the download cache (default: user cache folder)")
    parser.add_argument(
        "--files", action="store_true", help="list each file to download: URL, size, cache path, SHA-256"
    )


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="a dataset from `jax-mnist datasets`")
    parser.add_argument("--cache-dir", metavar="DIR", help="the download cache (default: user cache folder)")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where the comparison of several runs goes (default: the directory holding the runs)",
    )


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", type=Path, metavar="RUN|EXPORTED_FILE", help="a run directory or an exported model file"
    )
    add_checkpoint_flag(parser, "which checkpoint of a run", default=None)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free)"
    )
    parser.add_argument(
        "--engine",
        default="auto",
        choices=SERVE_ENGINES,
        help="what runs a run directory's model: jax, onnx (ONNX Runtime, converted in memory; "
        "needs the export extra), or auto: ONNX Runtime for lenet5, vgg and resnet on a CPU, "
        "where it is faster, JAX otherwise (default: auto)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=64,
        metavar="N",
        help="concurrent requests share one model call of up to N images; 1 turns batching off (default: 64)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="how long a batch waits for more requests after its first (default: 5)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="at most N prediction requests in the server at once; more are answered 503 with "
        "Retry-After at once; 0: no bound (default: 256)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a prediction not answered within S seconds is answered 504; 0: no limit (default: 10)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="on SIGTERM or Ctrl-C, stop accepting and finish the requests in flight for at most "
        "S seconds, then exit (default: 15)",
    )
    parser.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="no GET /metrics (Prometheus) and nothing counted for it",
    )


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_config_flags(parser)


def add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "root", nargs="?", type=Path, default=Path("runs"), metavar="DIR", help="default: runs"
    )


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """For the subcommands that take none (models, presets)."""


# -- the subcommands


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand of ``jax-mnist``.

    Attributes:
      name: what a user types (``jax-mnist NAME``).
      help: its line in ``jax-mnist --help``.
      add_arguments: adds its arguments to its subparser.
      run: its handler: parsed arguments in, exit code out.
      description: the text above its own ``--help`` (none if None).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


# In the order ``jax-mnist --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        "train a model (the seed CNN by default)",
        add_train_arguments,
        commands.cmd_train,
        description="Train a model. Every flag overrides the preset.",
    ),
    Command(
        "evaluate",
        "test metrics of trained runs; several runs are also evaluated as an ensemble",
        add_evaluate_arguments,
        commands.cmd_evaluate,
        description="Print test loss, accuracy, per-class accuracy and the confusion matrix of "
        "each run, and of their ensemble (averaged probabilities) when several are given.",
    ),
    Command(
        "predict",
        "predict the digit in image files or .npy arrays",
        add_predict_arguments,
        commands.cmd_predict,
        description="Predict the class of each input. Images of any size and either polarity are "
        "brought to MNIST's form first (grayscale, white on black, fitted in 20x20, "
        "centred by centre of mass in 28x28).",
    ),
    Command(
        "models",
        "list the architectures",
        _no_arguments,
        commands.cmd_models,
    ),
    Command(
        "presets",
        "list the presets and what they set",
        _no_arguments,
        commands.cmd_presets,
    ),
    Command(
        "datasets",
        "list the datasets, their sizes and whether each is cached",
        add_datasets_arguments,
        commands.cmd_datasets,
    ),
    Command(
        "download",
        "download a dataset into the cache and verify it (training downloads it too)",
        add_download_arguments,
        commands.cmd_download,
        description="Download a dataset's files from their official location (or $JAX_MNIST_MIRROR) "
        "into the cache, resuming a partial download, and check their SHA-256.",
    ),
    Command(
        "report",
        "figures and an HTML page of runs; several runs are also compared on one chart",
        add_report_arguments,
        commands.cmd_report,
        description="Write into each run directory curves.png, confusion.png, mistakes.png and "
        "a self-contained report.html. With several runs, also write comparison.png and "
        "comparison.html into --out.",
    ),
    Command(
        "export",
        "export a trained model to ONNX or StableHLO (jax.export), runnable without jax-mnist",
        add_export_arguments,
        commands.cmd_export,
        description="Write the model of a run as one file that takes raw pixels [N, 28, 28] and "
        "returns logits [N, C] (normalization inside), plus a JSON description beside it "
        "(<out>.json: classes, input contract, source run, test accuracy, SHA-256).",
    ),
    Command(
        "serve",
        "a draw-a-digit page and an HTTP API for a trained model",
        add_serve_arguments,
        commands.cmd_serve,
        description="Serve a trained model: a page to draw or upload digits at /, the HTTP API "
        "POST /api/predict and GET /api/model, its docs at /docs; /healthz, /readyz and /metrics for "
        "operators. Needs: pip install 'jax-mnist[serve]'.",
    ),
    Command(
        "tune",
        "search hyperparameters on the validation split with Optuna (pip install 'jax-mnist[tune]')",
        add_tune_arguments,
        commands.cmd_tune,
        description="Search hyperparameters with Optuna, scored by validation accuracy; the test set is "
        "never read. Every trial is a run directory STUDY/trial-NNNN. Flags of `jax-mnist train` fix "
        "those settings for every trial. Running the same command again continues the study.",
    ),
    Command(
        "runs",
        "list the runs under a directory with their results",
        add_runs_arguments,
        commands.cmd_runs,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-mnist", description="Train and use convolutional networks on MNIST with JAX."
    )
    parser.add_argument("--version", action="version", version=f"jax-mnist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_arguments(
            sub.add_parser(command.name, help=command.help, description=command.description)
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``jax-mnist`` with ``argv``; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Orbax logs through absl at WARNING for routine events (opening a run read-only), and at
    # ERROR, with tracebacks, for a failed save, which it also raises to us: said in one line.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        code = next(c for c in COMMANDS if c.name == args.command).run(args)
        sys.stdout.flush()  # here, so that a closed pipe is noticed below rather than at exit
        return code
    except UserError as e:
        print(f"jax-mnist: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("jax-mnist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output left early (`jax-mnist runs | head`): stop quietly, and
        # point stdout at /dev/null so that flushing it at exit raises nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except OSError as e:  # after BrokenPipeError, itself an OSError
        if (failure := write_failure(e)) is None:
            raise
        path, errno = failure
        print(f"jax-mnist: error: {path}: cannot write ({os.strerror(errno)})", file=sys.stderr)
        return WriteError.exit_code


if __name__ == "__main__":
    sys.exit(main())
