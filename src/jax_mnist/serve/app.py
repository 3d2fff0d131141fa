"""The HTTP app: a draw-a-digit page, ``POST /api/predict``, ``GET /api/model`` and ``/api/stats``,
and for operators ``GET /healthz``, ``/readyz`` and ``/metrics``.

:func:`create_app` takes a model that is already restored (a run's
:class:`~jax_mnist.inference.InferenceModel` or an exported one: anything with the
:class:`ServedModel` protocol) and the :class:`~jax_mnist.serve.settings.ServeSettings`, makes
the app's state (:class:`~jax_mnist.serve.state.ServingState`: the model, the micro-batcher, the metrics, whether the
model is ready or the server draining) and puts it at ``app.state.serving``, where the routes
of :mod:`jax_mnist.serve.routes` read it. Each request's images are brought to MNIST's form by the
same functions as ``jax-mnist predict`` (:func:`~jax_mnist.predict.decode_image`,
:func:`~jax_mnist.predict.to_mnist_form`), in a thread so a large image never holds up the
event loop; the model call is shared by concurrent requests through the
:class:`~jax_mnist.serve.batcher.MicroBatcher`. Bad input of any kind is answered with a 4xx
and ``{"error": "..."}``; nothing a request sends can name a file on the server.

The app's lifespan warms the model up in the background once it starts (a model call at every
batch size the batcher can form, so no request waits for a compilation); until then
``/readyz`` and ``/api/predict`` answer 503. At most ``max_queue`` prediction requests are in
the app at once (the next is answered 503 with ``Retry-After`` before its body is read), and
each has ``request_timeout`` seconds to be answered (504 after that).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from jax_mnist.serve.batcher import MicroBatcher
from jax_mnist.serve.routes import EXCEPTION_HANDLERS, STATIC, metrics_router, predict_router, router
from jax_mnist.serve.schema import MAX_IMAGES
from jax_mnist.serve.settings import ServeSettings
from jax_mnist.serve.state import MAX_BODY_BYTES, ServedModel, ServingState, warm_up_sizes

__all__ = ["MAX_BODY_BYTES", "ServedModel", "ServingState", "create_app", "lifespan", "warm_up_sizes"]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Starts the batcher and the warm-up; on shutdown, stops both."""
    state: ServingState = app.state.serving
    state.loop = asyncio.get_running_loop()
    state.batcher.start()
    # In the background: uvicorn listens only once this function yields, and /healthz is
    # to answer while the model compiles.
    warming = state.loop.create_task(state.warm_up())
    yield
    warming.cancel()
    await asyncio.gather(warming, return_exceptions=True)
    await state.batcher.close()


def create_app(
    model: ServedModel,
    settings: ServeSettings | None = None,
    *,
    max_body: int = MAX_BODY_BYTES,
    engine: str | None = None,
    on_warm_up: Callable[[float, str | None], None] | None = None,
) -> FastAPI:
    """The ASGI app serving ``model``.

    Args:
      model: an already restored model (see :class:`ServedModel`).
      settings: the batching (``max_batch`` images per model call, 1: no batching; a batch
        waits ``max_wait_ms`` for requests on their way after its first), the limits
        (``max_queue`` prediction requests in the app at once, from before their body is read
        to their answer, the next answered 503 with ``Retry-After``, 0: no bound;
        ``request_timeout`` seconds to answer one, 504 after, 0: no limit) and ``metrics``
        (``GET /metrics`` and counting for it); default: :class:`ServeSettings`'s defaults.
      max_body: request bodies larger than this many bytes are refused with 413.
      engine: what runs the model, in words (``/api/model`` reports it).
      on_warm_up: called with the warm-up's seconds and None, or its error in one line, when
        the warm-up ends (``serve`` prints the first and stops the server on the second).
    """
    settings = settings or ServeSettings()
    counted = None
    if settings.metrics:
        from jax_mnist.serve.metrics import ServerMetrics

        counted = ServerMetrics(
            max_batch=settings.max_batch,
            max_images=MAX_IMAGES,
            queue_depth=lambda: state.in_flight,
            queue_limit=settings.max_queue,
        )
    batcher = MicroBatcher(
        model.predict_logits,
        max_batch=settings.max_batch,
        max_wait=settings.max_wait,
        on_batch=counted.on_batch if counted else None,
    )
    state = ServingState(
        model,
        settings,
        batcher,
        class_names=list(model.class_names),
        description={**model.describe(), "engine": engine},
        metrics=counted,
        max_body=max_body,
        on_warm_up=on_warm_up,
    )
    # FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN; FastAPIOffline
    # serves the copies that the fastapi-offline package ships, so the docs work offline.
    app = FastAPIOffline(
        title="jax-mnist",
        summary="Predict the digit (or garment) in an image with a trained model.",
        version="1",
        lifespan=lifespan,
        static_url="/static-docs",
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.serving = state
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    if counted is not None:
        from jax_mnist.serve.metrics import CountRequests

        app.add_middleware(CountRequests, metrics=counted)
        app.include_router(metrics_router)
    app.include_router(predict_router(len(state.class_names)))
    return app
