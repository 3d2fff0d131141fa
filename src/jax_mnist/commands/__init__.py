"""The subcommands of ``jax-mnist``, one module each.

Each module holds one subcommand's ``NAME``, ``HELP`` (its line in ``jax-mnist --help``),
``DESCRIPTION`` (the text above its own ``--help``, or None), ``add_arguments(parser)`` and its
handler ``run(args) -> int``: parsed arguments in, a library call, printed output, exit code
out. :mod:`jax_mnist.cli` lists them in :data:`MODULES`' order. What several share (the
flags generated from a settings dataclass, ``--checkpoint``, the multi-process flags) is in
:mod:`jax_mnist.commands.common`. Importing them imports neither JAX nor NumPy: each handler
imports what it uses when it runs.
"""

from __future__ import annotations

from jax_mnist.commands import (
    datasets,
    download,
    evaluate,
    export,
    models,
    predict,
    presets,
    report,
    runs,
    serve,
    train,
    tune,
)

# In the order ``jax-mnist --help`` lists them.
MODULES = (train, evaluate, predict, models, presets, datasets, download, report, export, serve, tune, runs)
