"""Stopping a training run on SIGINT or SIGTERM: cleanly when it can, at once when it must.

- The first signal asks the loop to stop at its next check (a chunk boundary), after saving a
  checkpoint.
- A second signal ends the process at once, with one line.
- So does a first signal that the loop has not acted on within a bounded time: a run waiting
  in a collective that never returns (another process of the run died or stopped) never
  reaches its next check, and would otherwise ignore every polite request to stop.

Python runs signal handlers only in the main thread, between bytecodes; a main thread blocked
in XLA never gets there. So the signals are also read by a watcher thread, through the file
descriptor that Python's C-level handler writes each signal's number to
(:func:`signal.set_wakeup_fd`), whatever the main thread is doing.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A first signal is acted on within this long, or within twice the longest time the loop has
# taken between two checks so far (a slow model's chunk and its evaluation), if that is longer.
GRACE_S = 30.0


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop at the loop's next :meth:`check`.

    Use as a context manager around the loop (in the main thread; elsewhere signals are left
    alone). The loop calls :meth:`check` at each point where it can stop, and
    :meth:`acknowledge` once it has decided to.

    Args:
      resume_hint: the command that resumes the run, for the line printed when the process
        ends without a checkpoint.
      grace_s: the least time a first signal is given before the process ends at once.
    """

    def __init__(self, resume_hint: str, *, grace_s: float = GRACE_S):
        self.signum: int | None = None
        self._resume_hint = resume_hint
        self._grace_s = grace_s
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd = -1
        self._write_fd: int | None = None
        self._last_check = time.monotonic()
        self._longest_between_checks = 0.0
        self._acknowledged = threading.Event()
        self._closed = threading.Event()

    def check(self) -> int | None:
        """The first stop signal received so far, or None; also times the loop between checks."""
        now = time.monotonic()
        self._longest_between_checks = max(self._longest_between_checks, now - self._last_check)
        self._last_check = now
        return self.signum

    def acknowledge(self) -> None:
        """The loop is stopping (saving its checkpoint): no deadline applies any more."""
        self._acknowledged.set()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def _watch(self, read_fd: int) -> None:
        first: int | None = None
        first_at = 0.0
        try:
            while not self._closed.is_set():
                if first is not None and not self._acknowledged.is_set():
                    grace = max(self._grace_s, 2 * self._longest_between_checks)
                    if time.monotonic() - first_at > grace:
                        self._exit_now(
                            first,
                            f"{signal.Signals(first).name} not acted on within {grace:.0f} s (the run "
                            "is stuck, e.g. waiting for another process of the run)",
                        )
                if not select.select([read_fd], [], [], 0.5)[0]:
                    continue
                data = os.read(read_fd, 64)
                if not data:  # the write end is closed: the loop is over
                    return
                for signum in data:
                    if signum not in STOP_SIGNALS or self._closed.is_set():
                        continue
                    if first is None:
                        first, first_at = signum, time.monotonic()
                    else:
                        self._exit_now(signum, f"{signal.Signals(signum).name} again")
        finally:
            os.close(read_fd)

    def _exit_now(self, signum: int, why: str) -> None:
        print(
            f"jax-mnist: {why}: stopped at once, without saving a checkpoint. "
            f"Resume from the last one with: {self._resume_hint}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set in the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # Python's C handler must never block on it
        self._write_fd = write_fd
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="stop-signals").start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._write_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._write_fd)  # the watcher sees the end of the pipe, and closes its end
