"""uvicorn's server, made to drain on SIGTERM and SIGINT and then return (exit 0)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import TYPE_CHECKING

import uvicorn

if TYPE_CHECKING:
    from jax_mnist.serve.state import ServingState


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or SIGINT stops accepting, lets the requests in
    flight finish (``timeout_graceful_shutdown``) and then returns, rather than ending the
    process by the signal."""

    def __init__(self, config: uvicorn.Config, serving: ServingState, drain_timeout: float):
        super().__init__(config)
        self.serving = serving
        self.drain_timeout = drain_timeout

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own raises the signal again once it has shut down, so a server that
        # drained cleanly would still end killed by SIGTERM (exit 143) or by a
        # KeyboardInterrupt (130); a drained server has done what was asked: exit 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            # /readyz says "draining" from now on, and the requests in flight get until the end
            # of the drain. uvicorn's own deadline (timeout_graceful_shutdown) starts 0.1-0.2 s
            # later, once it has closed the listening socket: the app answers first.
            self.serving.begin_drain(self.drain_timeout)
            print(
                f"{signal.Signals(sig).name}: no new connections; finishing "
                f"{self.serving.in_flight} prediction requests in flight "
                f"(at most --drain-timeout {self.drain_timeout:g} s)",
                flush=True,
            )
        super().handle_exit(sig, frame)
