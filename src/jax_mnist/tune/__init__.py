"""``jax-mnist tune``: a hyperparameter search on the validation split with Optuna.

Each trial turns Optuna's suggestions into a :class:`~jax_mnist.config.Config` and trains it
as an ordinary run (:func:`~jax_mnist.train.train_and_evaluate`) in ``STUDY/trial-NNNN``; the
test set is never read. The parts:

- :mod:`jax_mnist.tune.space`: what a search varies (space files, the built-in spaces);
- :mod:`jax_mnist.tune.study`: the settings, Optuna's storage, the objective, the workers;
- :mod:`jax_mnist.tune.summary`: the ranked table, ``best.toml``, ``report.html``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from jax_mnist.rundir import TUNE_HOLDER, TUNE_LOCK, DirectoryLock
from jax_mnist.tune.space import Param, build_space, default_space, parse_space
from jax_mnist.tune.study import (
    TuneInterrupted,
    TuneSettings,
    counts,
    make_settings,
    open_study,
    redact,
    run_worker,
    run_worker_processes,
    training_cost,
)

__all__ = [
    "Param",
    "TuneInterrupted",
    "TuneSettings",
    "build_space",
    "default_space",
    "make_settings",
    "open_study",
    "parse_space",
    "summarize",
    "toml_text",
    "training_cost",
    "trial_rows",
    "tune",
]


# The summary draws with matplotlib and NumPy: loaded when first used, so that importing the
# package (the CLI reads the sampler and pruner names of tune.study) stays light.
_SUMMARY_NAMES = ("summarize", "toml_text", "trial_rows")


def __getattr__(name: str) -> Any:
    if name in _SUMMARY_NAMES:
        from jax_mnist.tune import summary

        return getattr(summary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tune(settings: TuneSettings, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the search (in this process, or in ``settings.workers`` worker processes), then
    writes the summary: the ranked table, ``best.toml`` and ``report.html`` in the study folder.

    Returns:
      ``{"trials": rows of :func:`trial_rows`, "best": the best row or None, "files": [...]}``.
    """
    # Two searches writing the study folder's own SQLite file would clash: one at a time. Studies
    # in a database server (--storage) are meant to be shared by several commands.
    lock = DirectoryLock(settings.study_dir, TUNE_LOCK, TUNE_HOLDER) if settings.storage is None else None
    with lock or contextlib.nullcontext():
        return _tune(settings, log)


def _tune(settings: TuneSettings, log: Callable[[str], None]) -> dict[str, Any]:
    settings.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings)  # creates the study (and the tables) once, before any worker
    finished, _ = counts(study)
    log(
        f"study {settings.name!r}: {finished} of {settings.trials} trials done; "
        f"storage {redact(settings.storage_url)}; searching {', '.join(p.describe() for p in settings.space)}"
    )
    t0 = time.perf_counter()
    if settings.workers == 1:
        run_worker(settings, log=log)
    else:
        run_worker_processes(settings)
    log(f"search took {time.perf_counter() - t0:.1f} s")
    from jax_mnist.tune.summary import summarize

    return summarize(settings, log=log)
