"""Run and study directories: one writer at a time, and files replaced whole.

**One writer.** An exclusive OS lock is held for as long as a run writes in its directory.

``jax-mnist train`` holds ``train.lock`` in its run directory (in a multi-process run, process
0 holds it), and ``jax-mnist tune`` holds ``tune.lock`` in a study directory whose SQLite file
it writes. The lock is ``flock(2)``: the kernel releases it when the process ends, however it
ends (``kill -9`` included), so a lock is never left stale. The file keeps the holder's PID,
host and start time, so that a second writer can be told who holds it. Readers (evaluate,
report, predict, serve, export, runs) never take it and never wait.

**Whole files.** :func:`write_atomically` writes a temporary file and renames it over the old
one: a crash or a full disk leaves the old file or the new one, never a part of either. The
file is flushed to the disk (``fsync``) before the rename, and its directory after it, so
that a power loss too leaves one or the other: without the first, the rename can reach the
disk before the data, and leave an empty file under the name.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import io
import json
import os
import socket
from pathlib import Path

from jax_mnist.errors import UserError, WriteError

TRAIN_LOCK = "train.lock"  # in a run directory
TRAIN_HOLDER = "another jax-mnist train is writing here"
TUNE_LOCK = "tune.lock"  # in a study directory
TUNE_HOLDER = "another jax-mnist tune is searching here"


class DirectoryBusy(UserError):
    """Another process holds the directory's lock; exits with code 2 and touches nothing."""

    exit_code = 2


class DirectoryLock:
    """An exclusive lock on ``directory`` (created if missing), as a context manager.

    Args:
      directory: the run or study directory.
      name: the lock file's name in it (``train.lock``, ``tune.lock``).
      what: how a refusal names the holder, e.g. ``another jax-mnist train is writing here``.

    Raises (on entering):
      DirectoryBusy: another process holds the lock.
      WriteError: the directory cannot be written (read-only, no permission, no space).
    """

    def __init__(self, directory: str | Path, name: str, what: str):
        self.directory = Path(directory)
        self.path = self.directory / name
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WriteError(f"{e.filename or self.directory}: cannot write here ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise WriteError(f"{self.path}: cannot lock ({e.strerror})") from None
            raise _busy(self.directory, self.path, self.what) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode())
        except OSError as e:
            os.close(fd)
            raise WriteError(f"{self.path}: cannot write ({e.strerror})") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the lock
            self._fd = None


def describe_holder(path: Path) -> str:
    """``PID 1234 on host-a, since 2026-12-07T08:00:00+00:00``, from a lock file."""
    try:
        holder = json.loads(path.read_text())
        return f"PID {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "by a process that has not yet said who it is"


def _busy(directory: Path, path: Path, what: str) -> DirectoryBusy:
    return DirectoryBusy(
        f"{directory}: {what} ({describe_holder(path)}); wait for it to finish, or use another directory"
    )


def check_can_write(directory: str | Path, name: str, what: str) -> None:
    """Refuses at once, before any work, a directory that cannot be written or is locked.

    Creates nothing: a directory that does not exist yet is judged by its nearest existing
    parent. Taking the lock for real (:class:`DirectoryLock`) still decides; this answers early.

    Raises:
      WriteError: the directory (or the parent it would be made in) is read-only or not ours.
      DirectoryBusy: another process holds the lock.
    """
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not existing.is_dir():
        return  # not a folder at all: what reads the run directory says so
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_mount(existing) else "permission denied"
        raise WriteError(f"{existing}: cannot write here ({reason})")
    path = directory / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file yet: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(directory, path, what) from None
    finally:
        os.close(fd)


def _read_only_mount(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def write_atomically(path: Path, data: str | bytes) -> None:
    """Replaces ``path`` with ``data`` (text is written as UTF-8) whole and durably.

    A temporary file beside it is written, flushed to the disk, renamed over ``path``, and the
    directory is flushed too (see the module doc).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def save_npz_atomically(path: Path, **arrays) -> None:
    """``np.savez(path, **arrays)`` (plain arrays, read without pickle), replaced whole and durably."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
