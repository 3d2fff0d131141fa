"""Orbax's reads left in flight: the hook filters that keep them from printing tracebacks.

When a file of a checkpoint is damaged, Orbax gives up at the first failed read with other
reads of that checkpoint still in flight in TensorStore; :func:`silence_reads_left_in_flight`
keeps what they report as they end from reaching the user, while a checkpoint directory is
open, and gives the hooks it wraps back after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from typing import Any, cast

from jax_mnist.checkpoint.damage import damage, from_tensorstore


class _AbandonedOrbaxTasks(logging.Filter):
    """Drops asyncio's report of a collected task or future whose error came from Orbax's code
    or from TensorStore (a read of a damaged checkpoint, or a write the disk refused, that Orbax
    gave up waiting for; raised from C++ code)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error, traceback = record.exc_info[1:] if record.exc_info else (None, None)
        # "Task exception was never retrieved", "Future ...", "_GatheringFuture ...": asyncio
        # names the class of what was dropped, then gives the context on lines of their own.
        abandoned = str(record.msg).partition("\n")[0].endswith("exception was never retrieved")
        return not (
            abandoned
            and (
                _closed_loop(error)
                or _from_orbax(traceback)
                or (error is not None and (from_tensorstore(error) or damage(error) is not None))
            )
        )


class _Filters:
    """One installation of the hook filters of :func:`silence_reads_left_in_flight`.

    Shared by every user that enters while it is in place; taken out when the last one leaves,
    unless a failure asked to keep it (:func:`keep_silencing_reads_left_in_flight`).
    """

    def __init__(self) -> None:
        self.users = 0
        self.kept = False
        self.previous = (sys.unraisablehook, sys.excepthook, threading.excepthook)
        previous_unraisable, previous_except, previous_thread = self.previous

        def unraisablehook(unraisable: Any) -> None:
            if (
                _closed_loop(unraisable.exc_value)
                or _from_orbax(unraisable.exc_traceback)
                or _orbax_coroutine(getattr(unraisable, "object", None))
            ):
                return
            previous_unraisable(unraisable)

        def excepthook(kind: Any, error: Any, traceback: Any) -> None:
            if not _closed_loop(error):
                previous_except(kind, error, traceback)

        def thread_hook(args: Any) -> None:
            if not _closed_loop(args.exc_value):
                previous_thread(args)

        unraisablehook._jax_mnist_filters = self  # type: ignore[attr-defined]
        self.hooks = (unraisablehook, excepthook, thread_hook)
        self._set(self.hooks)
        # An abandoned read that ran as an asyncio task is reported, when the task is collected,
        # through asyncio's logger ("Task exception was never retrieved").
        self.abandoned_tasks = _AbandonedOrbaxTasks()
        logging.getLogger("asyncio").addFilter(self.abandoned_tasks)
        # A read Orbax created but never awaited, as it gave up, is reported when collected as
        # a RuntimeWarning ("coroutine '_read_array_index_and_device_put' was never awaited"),
        # or, where warnings are errors, as an unraisable from that coroutine (dropped above).
        warnings.filterwarnings("ignore", _NEVER_AWAITED, RuntimeWarning)
        self.never_awaited = warnings.filters[0]

    def remove(self) -> None:
        """Puts back the hooks found at installation, where ours are still in place."""
        logging.getLogger("asyncio").removeFilter(self.abandoned_tasks)
        with contextlib.suppress(ValueError):  # gone already if warnings were reset since
            cast(list, warnings.filters).remove(self.never_awaited)  # a list, typed as a Sequence
        current = (sys.unraisablehook, sys.excepthook, threading.excepthook)
        self._set(
            tuple(
                previous if now is ours else now
                for now, ours, previous in zip(current, self.hooks, self.previous, strict=True)
            )
        )

    @staticmethod
    def _set(hooks: tuple[Any, ...]) -> None:
        sys.unraisablehook, sys.excepthook, threading.excepthook = hooks


_filters_lock = threading.RLock()  # re-entrant: a collected, unclosed Checkpoints leaves it too


def _installed_filters() -> _Filters | None:
    return getattr(sys.unraisablehook, "_jax_mnist_filters", None)


@contextlib.contextmanager
def silence_reads_left_in_flight() -> Iterator[None]:
    """Keeps the reads a failed restore left in flight from printing tracebacks, while entered.

    When a file of a checkpoint is damaged, Orbax gives up at the first failed read and closes
    its event loop while TensorStore still has other reads of that checkpoint in flight. As
    they complete, each tries to wake the closed loop (``RuntimeError: Event loop is closed``)
    or fails in an Orbax coroutine nobody awaits any more, and Python prints each as an
    "unraisable" traceback (or, from TensorStore's threads, through ``sys.excepthook`` and
    ``threading.excepthook``). Those reads are of the checkpoint already reported as damaged, so
    nothing is lost by not printing them; every other exception still goes to the hook that was
    there before.

    On entering, ``sys.unraisablehook``, ``sys.excepthook`` and ``threading.excepthook`` are
    wrapped in filters, asyncio's logger gets one, and the warning for a coroutine never awaited
    (a read Orbax created but dropped) is ignored (or the filters in place are shared); on leaving, the last user puts the
    hooks back as they were, unless :func:`keep_silencing_reads_left_in_flight` was called: then
    reads may still be in flight, and the filters stay until the process ends. Nested and
    overlapping uses are fine.
    """
    with _filters_lock:
        filters = _installed_filters() or _Filters()
        filters.users += 1
    try:
        yield
    finally:
        with _filters_lock:
            filters.users -= 1
            if filters.users == 0 and not filters.kept:
                filters.remove()


def keep_silencing_reads_left_in_flight() -> None:
    """Leaves the filters in place (if any) until the process ends.

    For when Orbax gave up with reads or writes still in flight: they end, or are collected,
    at any later time, after the last user of the filters has left too.
    """
    with _filters_lock:
        filters = _installed_filters()
        if filters is not None:
            filters.kept = True


@contextlib.contextmanager
def keeping_filters_on_failure() -> Iterator[None]:
    """Saves and waits that fail leave TensorStore writes in flight: keep the filters then."""
    try:
        yield
    except BaseException:
        keep_silencing_reads_left_in_flight()
        raise


_NEVER_AWAITED = r"coroutine '.*' was never awaited"


def _orbax_coroutine(value: Any) -> bool:
    return isinstance(value, types.CoroutineType) and _in_orbax(value.cr_code.co_filename)


def _in_orbax(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in filename


def _closed_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _from_orbax(traceback: Any) -> bool:
    while traceback is not None:
        if _in_orbax(traceback.tb_frame.f_code.co_filename):
            return True
        traceback = traceback.tb_next
    return False
