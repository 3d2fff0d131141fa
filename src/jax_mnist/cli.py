"""The ``jax-mnist`` command: parses arguments and dispatches to library functions.

Every subcommand is one row of :data:`COMMANDS`, made from its module in
:mod:`jax_mnist.commands`: its name and help line, the function that adds its arguments, and
its handler, which calls the library. Every flag of ``jax-mnist train`` is generated from a
field of :class:`jax_mnist.config.Config`, and those of ``jax-mnist serve`` from
:class:`jax_mnist.serve.settings.ServeSettings`. Importing this module imports neither JAX nor
NumPy, so ``--help`` and the light commands start at once; the handlers import what they use.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType

from jax_mnist import __version__
from jax_mnist.commands import MODULES
from jax_mnist.errors import UserError, WriteError, write_failure


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

    @classmethod
    def from_module(cls, module: ModuleType) -> Command:
        """The subcommand a module of :mod:`jax_mnist.commands` holds."""
        return cls(module.NAME, module.HELP, module.add_arguments, module.run, module.DESCRIPTION)


# In the order ``jax-mnist --help`` lists them.
COMMANDS: tuple[Command, ...] = tuple(Command.from_module(module) for module in MODULES)


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
