"""Where a study lives: Optuna imported quietly, its RDB storage opened, and the one retry of
what races with other processes (workers or commands opening one storage and one study).

Light to import: Optuna and SQLAlchemy are imported when first used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from jax_mnist.errors import UserError

T = TypeVar("T")

INSTALL_HINT = "pip install 'jax-mnist[tune]'"
# A worker's liveness signal: a trial whose worker stopped beating for GRACE_PERIOD_S (killed,
# machine lost) is marked failed by the next worker that looks.
HEARTBEAT_S = 10
GRACE_PERIOD_S = 40


def import_optuna():
    """Optuna, quiet but for errors; a one-line error naming the extra when it is not installed."""
    try:
        import optuna
    except ImportError:
        raise UserError(f"jax-mnist tune needs Optuna: {INSTALL_HINT}") from None
    import warnings

    # Errors only: a trial stopped by Ctrl-C would otherwise be logged with its traceback
    # ("Trial N failed ..."); our own lines say what happened to it.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Heartbeats and fail_stale_trials are marked experimental; we rely on them knowingly.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str):
    """Optuna's RDB storage at ``url`` with heartbeats, retried while another process creates it."""
    optuna = import_optuna()
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Writers queue for SQLite's lock instead of failing at once; workers write briefly.
        engine_kwargs = {"connect_args": {"timeout": 120}}

    def create() -> Any:
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_PERIOD_S,
            )
        except ModuleNotFoundError as e:
            raise UserError(
                f"--storage: the database driver {e.name!r} is not installed "
                "(for PostgreSQL: pip install psycopg2-binary)"
            ) from None

    # SQLAlchemy's errors: a race creating the tables, or no server.
    return retry_transient(create, f"--storage: cannot open {redact(url)}")


RETRY_ATTEMPTS = 10


def retry_transient(action: Callable[[], T], failure: str, *, attempts: int = RETRY_ATTEMPTS) -> T:
    """``action()``, tried again after a pause while it fails for a race with another process.

    Several workers (or commands) open one storage and one study at once: one of them may find
    the database locked, or lose a race to create the same table, row or study. Those failures
    (:func:`is_transient`) are tried again, up to ``attempts`` times in all, with pauses of
    0.5 s, 1.5 s, 2.5 s, ...

    Args:
      action: what to do; its :class:`UserError` goes through as it is.
      failure: the start of the one line said when it fails for good, e.g. ``--storage: cannot
        open URL``; the error's first line follows it.
      attempts: how many times to try in all.

    Returns:
      What ``action`` returns.

    Raises:
      UserError: ``action`` failed otherwise, or still failed transiently on its last try.
    """
    for attempt in range(attempts):
        try:
            return action()
        except UserError:
            raise
        except Exception as e:  # the storage's errors, whatever the database and its driver
            if attempt == attempts - 1 or not is_transient(e):
                raise UserError(f"{failure}: {e}".splitlines()[0]) from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a race another process caused.

    Optuna raises SQLAlchemy's errors as they are, or wraps them in its
    ``StorageInternalError``, so the chain of causes is searched.
    """
    optuna = import_optuna()
    import sqlalchemy.exc

    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, optuna.exceptions.DuplicatedStudyError):
            return True  # another command created the study first
        # These types also cover lasting failures (no server, a file that cannot be opened,
        # a constraint the data breaks), so the message tells the race apart: the database
        # locked by another writer (SQLite), a table, row or study created by another process
        # first (SQLite says "already exists", PostgreSQL "duplicate key ... unique constraint").
        if isinstance(
            e,
            (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError),
        ):
            text = str(e).lower()
            return any(
                s in text for s in ("database is locked", "already exists", "duplicate", "unique constraint")
            )
        e = e.__cause__ or e.__context__
    return False


def redact(url: str) -> str:
    """``url`` without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        if ":" in credentials:
            return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url
