"""The state of the HTTP app: what it serves and where it stands.

:func:`~jax_mnist.serve.app.create_app` makes one :class:`ServingState` per app and puts it at
``app.state.serving``; the app's lifespan starts its batcher and its warm-up, the routes of
:mod:`jax_mnist.serve.routes` read it, and the server's signal handler begins its drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from jax_mnist.serve.batcher import MicroBatcher
from jax_mnist.serve.settings import ServeSettings

if TYPE_CHECKING:
    from jax_mnist.serve.metrics import ServerMetrics

MAX_BODY_BYTES = 10 * 1024 * 1024


class ServedModel(Protocol):
    """What the server needs of a model: a run's InferenceModel, or an exported model."""

    @property
    def class_names(self) -> Sequence[str]: ...

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits float32 ``[N, C]`` for uint8 or [0, 1] float images ``[N, 28, 28]``."""
        ...

    def describe(self) -> dict[str, Any]: ...


@dataclasses.dataclass(eq=False)
class ServingState:
    """The app's state, which its routes read from ``request.app.state.serving``.

    What it serves: ``model`` (its ``class_names`` and ``description`` for ``/api/model``),
    by ``settings``, through ``batcher``, counted by ``metrics`` (None: ``--no-metrics``);
    request bodies over ``max_body`` bytes are refused.

    Where it stands: ``status`` is ``warming up``, then ``ready`` once the model has answered
    its warm-up batches, ``draining`` once shutdown began, or ``failed`` (``error`` says why) if
    the warm-up failed. ``in_flight``: prediction requests in the app now.
    """

    model: ServedModel
    settings: ServeSettings
    batcher: MicroBatcher
    class_names: list[str]
    description: dict[str, Any]
    metrics: ServerMetrics | None = None
    max_body: int = MAX_BODY_BYTES
    on_warm_up: Callable[[float, str | None], None] | None = None
    status: str = "warming up"
    error: str | None = None
    in_flight: int = 0
    drain_at: float | None = None  # the event loop's time by which a drain must be done
    loop: asyncio.AbstractEventLoop | None = None
    # The deadlines of the prediction requests in flight (asyncio.timeout scopes).
    deadlines: set[asyncio.Timeout] = dataclasses.field(default_factory=set)

    def begin_drain(self, seconds: float) -> None:
        """Shutdown has begun: every request in flight is to be answered within ``seconds``.
        Safe to call from a signal handler or another thread."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._drain, seconds)

    def _drain(self, seconds: float) -> None:
        assert self.loop is not None  # set by the lifespan, before any drain
        self.status = "draining"
        self.drain_at = self.loop.time() + seconds
        for deadline in self.deadlines:
            self.bring_forward(deadline)

    def bring_forward(self, deadline: asyncio.Timeout) -> None:
        """Moves ``deadline`` to the drain's, if it is later. A request still in flight then is
        answered 503 by the app, which uvicorn would otherwise cancel (at the same time, a
        little later) and answer with a bare 500 and a traceback in the log."""
        when = deadline.when()
        if self.drain_at is not None and (when is None or when > self.drain_at):
            deadline.reschedule(self.drain_at)

    async def warm_up(self) -> None:
        """A model call of every batch size the batcher can form; then ``ready``, or ``failed``."""
        start = time.perf_counter()
        classes = len(self.class_names)
        try:
            for size in warm_up_sizes(self.settings.max_batch):
                logits = await self.batcher.run_alone(np.zeros((size, 28, 28), np.float32))
                if np.shape(logits) != (size, classes) or not np.isfinite(logits).all():
                    raise ValueError(
                        f"a warm-up batch of {size} zero images gave logits of shape "
                        f"{list(np.shape(logits))}, finite: {bool(np.isfinite(logits).all())}; "
                        f"expected [{size}, {classes}], finite"
                    )
        except Exception as e:
            self.status, self.error = "failed", f"the model failed its warm-up: {e}".splitlines()[0]
        else:
            if self.status == "warming up":
                self.status = "ready"
        if self.on_warm_up is not None:
            self.on_warm_up(time.perf_counter() - start, self.error)


def warm_up_sizes(max_batch: int) -> list[int]:
    """The batch sizes a warm-up runs: one of each shape ``predict_logits`` compiles (it pads a
    batch to a power of two), up to ``max_batch``."""
    sizes, size = [], 1
    while size < 2 * max_batch:
        sizes.append(min(size, max_batch))
        size *= 2
    return sizes
