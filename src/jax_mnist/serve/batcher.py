"""A micro-batcher: concurrent requests share one model call.

Each request hands its images to :meth:`MicroBatcher.predict` and awaits its own logits.
One worker task gathers what is waiting into a batch of at most ``max_batch`` images and
runs the model on it in a thread, so the event loop keeps accepting requests meanwhile.
Requests that arrive during a model call wait for the next one: the busier the server, the
fuller the batches, so throughput grows with load.

A batch also waits for requests that are on their way (announced with
:meth:`MicroBatcher.expecting` while the server reads and preprocesses them), at most
``max_wait`` seconds after its oldest request arrived. A lone request, with nothing on its
way, never waits.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np


@dataclasses.dataclass
class BatchStats:
    """What the batcher did: how many model calls, images and requests, and batch sizes."""

    calls: int = 0
    images: int = 0
    requests: int = 0
    largest: int = 0
    seconds: float = 0.0  # in model calls (in the model's thread)
    longest: float = 0.0  # the longest model call, seconds
    # batch size (images) -> how many model calls had it
    sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def record(self, images: int, requests: int, seconds: float) -> None:
        self.calls += 1
        self.images += images
        self.requests += requests
        self.largest = max(self.largest, images)
        self.sizes[images] += 1
        self.seconds += seconds
        self.longest = max(self.longest, seconds)

    def to_dict(self) -> dict:
        return {
            "calls": self.calls,
            "images": self.images,
            "requests": self.requests,
            "largest_batch": self.largest,
            "mean_batch": self.images / self.calls if self.calls else 0.0,
            "model_seconds": self.seconds,
            "longest_call_ms": 1000 * self.longest,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
        }


@dataclasses.dataclass
class _Waiting:
    images: np.ndarray
    future: asyncio.Future
    arrived: float


class MicroBatcher:
    """Runs ``fn`` on batches gathered from concurrent :meth:`predict` calls.

    Args:
      fn: the model call, ``float [N, 28, 28] -> [N, C]``; run in a worker thread, one call
        at a time.
      max_batch: at most this many images per call (a request with more goes alone). 1 turns
        batching off: every request is its own call, with no waiting.
      max_wait: seconds a batch waits for requests on their way after its oldest one arrived.
      on_batch: called in the event loop after each model call that answered, with its
        images, its requests and the seconds it took (the server's metrics count them).
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 64,
        max_wait: float = 0.005,
        on_batch: Callable[[int, int, float], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be at least 0, got {max_wait}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._waiting_images = 0
        self._expected = 0  # requests on their way (see expecting)
        self._arrival = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """The rows of ``fn``'s output for ``images`` ``[n, 28, 28]``: ``[n, C]``."""
        return await self.submit(images)

    def submit(self, images: np.ndarray) -> asyncio.Future:
        """Queues ``images`` ``[n, 28, 28]``; the future gets their rows of ``fn``'s output."""
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self.start()
        future = loop.create_future()
        self._waiting.append(_Waiting(images, future, loop.time()))
        self._waiting_images += len(images)
        self._arrival.set()
        return future

    async def run_alone(self, images: np.ndarray) -> np.ndarray:
        """``fn(images)`` in the model's thread, outside the batches and the stats: the
        server's warm-up (compiling each batch shape) runs here, before any request does."""
        if self._worker is None:
            self.start()
        out, _ = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, images)
        return out

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Marks a request on its way: batches wait for it (up to ``max_wait``) until it is
        :meth:`submit`-ted inside this block, or the block ends without it."""
        self._expected += 1
        try:
            yield
        finally:
            self._expected -= 1
            self._arrival.set()  # the worker looks again at whether to wait

    def start(self) -> None:
        """Starts the worker task on the running event loop (``predict`` starts it too)."""
        if self._worker is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stops the worker; requests still waiting get a RuntimeError."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while self._waiting:
            item = self._waiting.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        self._waiting_images = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrival.clear()
                await self._arrival.wait()
            # Wait for requests on their way until the batch is full or its oldest request
            # waited max_wait (which it may already have done while the previous call ran).
            deadline = self._waiting[0].arrived + self.max_wait
            while (
                self._expected > 0
                and self._waiting_images < self.max_batch
                and (remaining := deadline - loop.time()) > 0
            ):
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:  # every waiting caller had gone away
                continue
            images = batch[0].images if len(batch) == 1 else np.concatenate([b.images for b in batch])
            try:
                out, seconds = await loop.run_in_executor(self._executor, self._timed, images)
            except Exception as e:
                self.stats.record(len(images), len(batch), 0.0)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            self.stats.record(len(images), len(batch), seconds)
            if self.on_batch is not None:
                self.on_batch(len(images), len(batch), seconds)
            start = 0
            for item in batch:
                if not item.future.done():  # a caller that went away is skipped
                    item.future.set_result(out[start : start + len(item.images)])
                start += len(item.images)

    def _timed(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        out = self.fn(images)
        return out, time.perf_counter() - start

    def _take(self) -> list[_Waiting]:
        """Takes waiting requests off the queue, oldest first, up to ``max_batch`` images."""
        batch: list[_Waiting] = []
        size = 0
        while self._waiting:
            item = self._waiting[0]
            if batch and size + len(item.images) > self.max_batch:
                break
            self._waiting.popleft()
            self._waiting_images -= len(item.images)
            if item.future.done():  # cancelled: its client disconnected
                continue
            batch.append(item)
            size += len(item.images)
        return batch
