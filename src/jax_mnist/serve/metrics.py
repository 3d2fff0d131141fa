"""The server's Prometheus metrics (``GET /metrics``), kept by prometheus-client.

Each app has a registry of its own rather than prometheus-client's global one, so that two
apps in one process (tests, benchmarks) count apart. What is counted:

- ``jax_mnist_http_requests_total{route, method, status}``: requests answered. ``route`` is the
  route's template (``/api/predict``, ``/static``), ``unmatched`` for a path no route serves,
  so a client sending random paths cannot grow the number of series.
- ``jax_mnist_http_request_duration_seconds{route}``: from the request's arrival in the app
  to the end of its answer.
- ``jax_mnist_batch_size_images``, ``jax_mnist_model_call_seconds``: each model call the
  batcher made, and ``jax_mnist_images_predicted_total``: the images those calls answered.
- ``jax_mnist_queue_depth``: prediction requests in the server now (read, preprocessed,
  waiting for a batch or in the model call); ``jax_mnist_queue_limit``: ``--max-queue``
  (0: no bound). Read when scraped, so requests pay nothing for them.
- ``process_*``: the process's CPU time, resident memory, open files (prometheus-client's
  ``ProcessCollector``, on Linux).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "CountRequests", "ServerMetrics"]

# Seconds. The fine end resolves single-image predictions (about 1-3 ms on a CPU core); the
# coarse end reaches the default --request-timeout (10 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MODEL_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServerMetrics:
    """The metrics of one app, and the ASGI middleware that counts its requests.

    Args:
      max_batch: the batcher's ``max_batch``; batch-size buckets are the powers of two up to
        it and up to ``max_images`` (a request with more images than ``max_batch`` goes alone).
      max_images: the most images one request may hold.
      queue_depth: returns the number of prediction requests in the server now.
      queue_limit: ``--max-queue`` (0: no bound).
    """

    def __init__(self, *, max_batch: int, max_images: int, queue_depth: Callable[[], int], queue_limit: int):
        # The *_created series (when each series began) double what a scrape reads and
        # Prometheus's text format has no use for them. (A switch of prometheus-client's, for
        # the whole process: the server is the process.)
        disable_created_metrics()
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.requests = Counter(
            "jax_mnist_http_requests",
            "HTTP requests answered, by route template, method and status code",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "jax_mnist_http_request_duration_seconds",
            "Time from a request's arrival in the app to the end of its answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        largest = max(max_batch, max_images)
        sizes = [2**i for i in range(largest.bit_length()) if 2**i < largest] + [largest]
        self.batch_size = Histogram(
            "jax_mnist_batch_size_images",
            "Images in each model call the batcher made",
            buckets=sizes,
            registry=registry,
        )
        self.model_seconds = Histogram(
            "jax_mnist_model_call_seconds",
            "Time of each model call (in the model's thread)",
            buckets=MODEL_CALL_BUCKETS,
            registry=registry,
        )
        self.images = Counter("jax_mnist_images_predicted", "Images the model answered", registry=registry)
        depth = Gauge(
            "jax_mnist_queue_depth",
            "Prediction requests in the server now: being read, preprocessed, waiting for a batch "
            "or in the model call",
            registry=registry,
        )
        depth.set_function(lambda: float(queue_depth()))
        Gauge(
            "jax_mnist_queue_limit",
            "The most prediction requests the server holds at once (--max-queue; 0: no bound)",
            registry=registry,
        ).set(queue_limit)

    def on_batch(self, images: int, requests: int, seconds: float) -> None:
        """Counts one model call (the batcher's ``on_batch``)."""
        self.batch_size.observe(images)
        self.model_seconds.observe(seconds)
        self.images.inc(images)

    def render(self) -> bytes:
        """The metrics in Prometheus's text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class CountRequests:
    """A pure ASGI middleware that counts and times the HTTP requests of ``app`` in ``metrics``
    (``app.add_middleware(CountRequests, metrics=...)``)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.requests = metrics.requests
        self.latency = metrics.latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the outermost middleware answers for an exception that escapes

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            # Starlette's router leaves the route it matched in the scope.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.requests.labels(route, scope["method"], str(status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - start)
