"""The HTTP app: a draw-a-digit page, ``POST /api/predict``, ``GET /api/model`` and ``/api/stats``,
and for operators ``GET /healthz``, ``/readyz`` and ``/metrics``.

:func:`create_app` takes a model that is already restored (a run's
:class:`~jax_mnist.inference.InferenceModel` or an exported one: anything with the
:class:`ServedModel` protocol). Each request's images are brought to MNIST's form by the
same functions as ``jax-mnist predict`` (:func:`~jax_mnist.predict.decode_image`,
:func:`~jax_mnist.predict.to_mnist_form`), in a thread so a large image never holds up the
event loop; the model call is shared by concurrent requests through the
:class:`~jax_mnist.serve.batcher.MicroBatcher`. Bad input of any kind is answered with a 4xx
and ``{"error": "..."}``; nothing a request sends can name a file on the server.

The app warms the model up in the background once it starts (a model call at every batch
size the batcher can form, so no request waits for a compilation); until then ``/readyz`` and
``/api/predict`` answer 503. At most ``max_queue`` prediction requests are in the app at once
(the next is answered 503 with ``Retry-After`` before its body is read), and each has
``request_timeout`` seconds to be answered (504 after that).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from jax_mnist.predict import ImageError, prediction_records
from jax_mnist.serve.batcher import MicroBatcher
from jax_mnist.serve.requests import (
    SMALL_BYTES,
    SMALL_PIXELS,
    ApiError,
    arrays_from_json,
    decode_upload,
    form_file,
    mnist_form_all,
    read_body,
    small_image,
)
from jax_mnist.serve.schema import MAX_IMAGES, PREDICT_BODY, PREDICT_RESPONSES, RETRY, Status
from jax_mnist.serve.settings import ServeSettings

STATIC = resources.files("jax_mnist.serve") / "static"
MAX_BODY_BYTES = 10 * 1024 * 1024
# What a 503 asks a client to wait before it tries again, in seconds: a full queue empties
# in a few model calls (milliseconds), a warm-up takes seconds; a second is a fair middle.
RETRY_AFTER_S = 1


class ServedModel(Protocol):
    """What the server needs of a model: a run's InferenceModel, or an exported model."""

    @property
    def class_names(self) -> Sequence[str]: ...

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """Logits float32 ``[N, C]`` for uint8 or [0, 1] float images ``[N, 28, 28]``."""
        ...

    def describe(self) -> dict[str, Any]: ...


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclasses.dataclass
class ServingState:
    """Where the app stands: ``status`` is ``warming up``, then ``ready`` once the model has
    answered its warm-up batches, ``draining`` once shutdown began, or ``failed`` (``error``
    says why) if the warm-up failed. ``in_flight``: prediction requests in the app now."""

    status: str = "warming up"
    error: str | None = None
    in_flight: int = 0
    drain_at: float | None = None  # the event loop's time by which a drain must be done
    loop: asyncio.AbstractEventLoop | None = None
    # The deadlines of the prediction requests in flight (asyncio.timeout scopes).
    deadlines: set = dataclasses.field(default_factory=set)

    def begin_drain(self, seconds: float) -> None:
        """Shutdown has begun: every request in flight is to be answered within ``seconds``.
        Safe to call from a signal handler or another thread."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._drain, seconds)

    def _drain(self, seconds: float) -> None:
        self.status = "draining"
        self.drain_at = self.loop.time() + seconds
        for deadline in self.deadlines:
            self.bring_forward(deadline)

    def bring_forward(self, deadline: asyncio.Timeout) -> None:
        """Moves ``deadline`` to the drain's, if it is later. A request still in flight then is
        answered 503 by the app, which uvicorn would otherwise cancel (at the same time, a
        little later) and answer with a bare 500 and a traceback in the log."""
        if self.drain_at is not None and (deadline.when() is None or deadline.when() > self.drain_at):
            deadline.reschedule(self.drain_at)


def warm_up_sizes(max_batch: int) -> list[int]:
    """The batch sizes a warm-up runs: one of each shape ``predict_logits`` compiles (it pads a
    batch to a power of two), up to ``max_batch``."""
    sizes, size = [], 1
    while size < 2 * max_batch:
        sizes.append(min(size, max_batch))
        size *= 2
    return sizes


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
    max_batch, max_wait, max_queue = settings.max_batch, settings.max_wait, settings.max_queue
    request_timeout, metrics = settings.request_timeout, settings.metrics
    class_names = list(model.class_names)
    description = {**model.describe(), "engine": engine}
    state = ServingState()
    timeout = request_timeout or None
    counted = None
    if metrics:
        from jax_mnist.serve.metrics import ServerMetrics

        counted = ServerMetrics(
            max_batch=max_batch,
            max_images=MAX_IMAGES,
            queue_depth=lambda: state.in_flight,
            queue_limit=max_queue,
        )
    batcher = MicroBatcher(
        model.predict_logits,
        max_batch=max_batch,
        max_wait=max_wait,
        on_batch=counted.on_batch if counted else None,
    )

    async def warm_up() -> None:
        start = time.perf_counter()
        try:
            for size in warm_up_sizes(max_batch):
                logits = await batcher.run_alone(np.zeros((size, 28, 28), np.float32))
                if np.shape(logits) != (size, len(class_names)) or not np.isfinite(logits).all():
                    raise ValueError(
                        f"a warm-up batch of {size} zero images gave logits of shape "
                        f"{list(np.shape(logits))}, finite: {bool(np.isfinite(logits).all())}; "
                        f"expected [{size}, {len(class_names)}], finite"
                    )
        except Exception as e:
            state.status, state.error = "failed", f"the model failed its warm-up: {e}".splitlines()[0]
        else:
            if state.status == "warming up":
                state.status = "ready"
        if on_warm_up is not None:
            on_warm_up(time.perf_counter() - start, state.error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        batcher.start()
        # In the background: uvicorn listens only once this function yields, and /healthz is
        # to answer while the model compiles.
        warming = asyncio.get_running_loop().create_task(warm_up())
        yield
        warming.cancel()
        await asyncio.gather(warming, return_exceptions=True)
        await batcher.close()

    # FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN; FastAPIOffline
    # serves the copies that the fastapi-offline package ships, so the docs work offline.
    app = FastAPIOffline(
        title="jax-mnist",
        summary="Predict the digit (or garment) in an image with a trained model.",
        version="1",
        lifespan=lifespan,
        static_url="/static-docs",
    )
    app.state.batcher = batcher
    app.state.serving = state
    if counted is not None:
        from jax_mnist.serve.metrics import CountRequests

        app.add_middleware(CountRequests, metrics=counted)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server's log (uvicorn prints it), not to the client.
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/api/model", summary="What model is loaded")
    async def model_info() -> dict[str, Any]:
        """Architecture, parameter count, source run, accuracy and class names of the model,
        the batching settings and the limits on requests (0 or null: none)."""
        return {
            **description,
            "batching": {"max_batch": max_batch, "max_wait_ms": 1000 * max_wait},
            "limits": {
                "max_queue": max_queue,
                "request_timeout_s": timeout,
                "max_body_bytes": max_body,
                "max_images": MAX_IMAGES,
            },
        }

    @app.get("/api/stats", summary="How requests were batched")
    async def stats() -> dict[str, Any]:
        """Model calls, images and requests so far, and how many calls had each batch size."""
        return {**batcher.stats.to_dict(), "max_batch": max_batch, "max_wait_ms": 1000 * max_wait}

    @app.get(
        "/healthz",
        summary="Whether the process is up",
        response_model=Status,
        response_model_exclude_none=True,
    )
    async def healthz() -> dict[str, str]:
        """200 while the server process runs and its event loop answers; nothing else is looked at."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Whether the model is ready for predictions",
        response_model=Status,
        response_model_exclude_none=True,
        responses={503: {"model": Status, "description": "warming up, draining or failed", **RETRY}},
    )
    async def readyz() -> Any:
        """200 once the model has answered its warm-up batches (one of each batch shape it
        compiles); 503 while it warms up, once shutdown has begun (``draining``), or if the
        warm-up failed (``failed``, with ``error``)."""
        if state.status == "ready":
            return {"status": "ready"}
        body = {"status": state.status, **({"error": state.error} if state.error else {})}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    if counted is not None:

        @app.get(
            "/metrics",
            summary="Prometheus metrics",
            response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        )
        async def prometheus_metrics() -> Response:
            """Requests by route and status, request latency, batch sizes, model call time,
            images predicted, queue depth and limit, in Prometheus's text format."""
            from jax_mnist.serve.metrics import CONTENT_TYPE

            return Response(counted.render(), media_type=CONTENT_TYPE)

    @app.post(
        "/api/predict",
        summary="Predict the class of images",
        openapi_extra={"requestBody": PREDICT_BODY},
        responses=PREDICT_RESPONSES,
    )
    async def predict(
        request: Request, top: int = Query(1, ge=1, le=len(class_names), description="how many best classes")
    ) -> JSONResponse:
        """An image file (multipart upload or the raw body with its image content type), or
        JSON ``{"image": [[...]]}`` / ``{"images": [...]}`` of 2-D arrays of any size and
        either polarity. Each image is brought to MNIST's form exactly as by ``jax-mnist
        predict``; the answer has its classes, probabilities and the 28x28 image the model saw.
        """
        if state.status not in ("ready", "draining"):
            message = state.error or "the model is warming up"
            raise ApiError(503, f"{message}; retry later", {"Retry-After": str(RETRY_AFTER_S)})
        if max_queue and state.in_flight >= max_queue:
            # At once, before the body is read: an overloaded server spends nothing more on it.
            raise ApiError(
                503,
                f"the server is busy: {state.in_flight} prediction requests are in it, the most "
                f"--max-queue allows; retry after {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        state.in_flight += 1
        try:
            async with asyncio.timeout(timeout) as deadline:
                state.bring_forward(deadline)
                state.deadlines.add(deadline)
                try:
                    return await answer(request, top)
                finally:
                    state.deadlines.discard(deadline)
        except TimeoutError:
            if state.drain_at is not None and asyncio.get_running_loop().time() >= state.drain_at:
                raise ApiError(
                    503,
                    "the server is shutting down and could not answer within its --drain-timeout; "
                    "retry, another server may answer",
                    {"Retry-After": str(RETRY_AFTER_S)},
                ) from None
            raise ApiError(
                504, f"no answer within the {request_timeout:g} s the server allows a request"
            ) from None
        finally:
            state.in_flight -= 1

    async def answer(request: Request, top: int) -> JSONResponse:
        with batcher.expecting():  # a batch forming now waits for this request
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            body = await read_body(request, max_body)
            json_type = content_type == "application/json" or content_type.endswith("+json")
            if not (
                json_type
                or content_type in ("multipart/form-data", "application/octet-stream")
                or content_type.startswith("image/")
            ):
                raise ApiError(
                    415,
                    f"unsupported content type {content_type or '(none)'!r}: send an image file "
                    "(image/png, image/jpeg, ... or multipart/form-data) or application/json",
                )
            if not body:
                raise ApiError(400, "the request body is empty: send an image file or JSON")
            upload = await form_file(request, body) if content_type == "multipart/form-data" else None
            # Small inputs are preprocessed here, large ones in a thread so that they do not
            # hold up the other requests.
            if json_type:
                small = len(body) <= SMALL_BYTES
                names, arrays = (
                    arrays_from_json(body) if small else await asyncio.to_thread(arrays_from_json, body)
                )
                work = functools.partial(mnist_form_all, names, arrays)
                small = len(arrays) <= 4 and sum(a.size for a in arrays) <= SMALL_PIXELS
            else:
                names = [upload[0] if upload else "image"]
                data = upload[1] if upload else body
                work = functools.partial(decode_upload, data, names[0])
                small = small_image(data)
            images = work() if small else await asyncio.to_thread(work)
            answer = batcher.submit(images)
        logits = await answer
        records = prediction_records(class_names, names, logits, top=top)
        for record, image in zip(records, images, strict=True):
            record["image"] = np.round(image.astype(np.float64), 4).tolist()  # short decimals
        return JSONResponse({"classes": class_names, "predictions": records})

    return app
