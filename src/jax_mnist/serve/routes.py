"""The routes of the HTTP app, on :class:`fastapi.APIRouter` s, and how errors are answered.

Every route reads the app's state (:class:`~jax_mnist.serve.state.ServingState`: the model, the
batcher, the metrics, readiness) from ``request.app.state.serving``, through the
:data:`Serving` dependency; :func:`~jax_mnist.serve.app.create_app` makes the state and
includes :data:`router`, :data:`metrics_router` (unless ``--no-metrics``) and
:func:`predict_router`. Every error is answered ``{"error": "..."}`` with its status.
"""

from __future__ import annotations

import asyncio
import functools
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from jax_mnist.predict import ImageError, prediction_records
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
from jax_mnist.serve.state import ServingState

STATIC = resources.files("jax_mnist.serve") / "static"
# What a 503 asks a client to wait before it tries again, in seconds: a full queue empties
# in a few model calls (milliseconds), a warm-up takes seconds; a second is a fair middle.
RETRY_AFTER_S = 1


def serving_state(request: Request) -> ServingState:
    """The state of the app that received ``request``."""
    return request.app.state.serving


Serving = Annotated[ServingState, Depends(serving_state)]


# -- errors


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.message, exc.headers)


async def image_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(400, str(exc))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first.get("loc", ()))
    return _error(422, f"{where}: {first.get('msg', 'invalid')}")


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the server's log (uvicorn prints it), not to the client.
    return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")


EXCEPTION_HANDLERS = {
    ApiError: api_error,
    ImageError: image_error,
    StarletteHTTPException: http_error,
    RequestValidationError: validation_error,
    Exception: internal_error,
}


# -- the page, what is served, and for operators

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(str(STATIC / "index.html"))


@router.get("/api/model", summary="What model is loaded")
async def model_info(state: Serving) -> dict[str, Any]:
    """Architecture, parameter count, source run, accuracy and class names of the model,
    the batching settings and the limits on requests (0 or null: none)."""
    return {
        **state.description,
        "batching": {"max_batch": state.settings.max_batch, "max_wait_ms": 1000 * state.settings.max_wait},
        "limits": {
            "max_queue": state.settings.max_queue,
            "request_timeout_s": state.settings.request_timeout or None,
            "max_body_bytes": state.max_body,
            "max_images": MAX_IMAGES,
        },
    }


@router.get("/api/stats", summary="How requests were batched")
async def stats(state: Serving) -> dict[str, Any]:
    """Model calls, images and requests so far, and how many calls had each batch size."""
    return {
        **state.batcher.stats.to_dict(),
        "max_batch": state.settings.max_batch,
        "max_wait_ms": 1000 * state.settings.max_wait,
    }


@router.get(
    "/healthz",
    summary="Whether the process is up",
    response_model=Status,
    response_model_exclude_none=True,
)
async def healthz() -> dict[str, str]:
    """200 while the server process runs and its event loop answers; nothing else is looked at."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Whether the model is ready for predictions",
    response_model=Status,
    response_model_exclude_none=True,
    responses={503: {"model": Status, "description": "warming up, draining or failed", **RETRY}},
)
async def readyz(state: Serving) -> Any:
    """200 once the model has answered its warm-up batches (one of each batch shape it
    compiles); 503 while it warms up, once shutdown has begun (``draining``), or if the
    warm-up failed (``failed``, with ``error``)."""
    if state.status == "ready":
        return {"status": "ready"}
    body = {"status": state.status, **({"error": state.error} if state.error else {})}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


metrics_router = APIRouter()


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(state: Serving) -> Response:
    """Requests by route and status, request latency, batch sizes, model call time,
    images predicted, queue depth and limit, in Prometheus's text format."""
    from jax_mnist.serve.metrics import CONTENT_TYPE

    assert state.metrics is not None  # the route is there only with metrics
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


# -- predictions


def predict_router(num_classes: int) -> APIRouter:
    """``POST /api/predict`` for a model of ``num_classes`` classes, the most ``top`` may ask
    for (its OpenAPI schema says so too)."""
    predictions = APIRouter()

    @predictions.post(
        "/api/predict",
        summary="Predict the class of images",
        openapi_extra={"requestBody": PREDICT_BODY},
        responses=PREDICT_RESPONSES,
    )
    async def predict(
        request: Request,
        state: Serving,
        top: int = Query(1, ge=1, le=num_classes, description="how many best classes"),
    ) -> JSONResponse:
        """An image file (multipart upload or the raw body with its image content type), or
        JSON ``{"image": [[...]]}`` / ``{"images": [...]}`` of 2-D arrays of any size and
        either polarity. Each image is brought to MNIST's form exactly as by ``jax-mnist
        predict``; the answer has its classes, probabilities and the 28x28 image the model saw.
        """
        return await answer_in_time(request, state, top)

    return predictions


async def answer_in_time(request: Request, state: ServingState, top: int) -> JSONResponse:
    """The answer to a prediction request, if the model is ready, the queue not full and the
    answer comes within ``--request-timeout`` (or the drain's end); an :class:`ApiError` if not."""
    if state.status not in ("ready", "draining"):
        message = state.error or "the model is warming up"
        raise ApiError(503, f"{message}; retry later", {"Retry-After": str(RETRY_AFTER_S)})
    max_queue = state.settings.max_queue
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
        async with asyncio.timeout(state.settings.request_timeout or None) as deadline:
            state.bring_forward(deadline)
            state.deadlines.add(deadline)
            try:
                return await answer(request, state, top)
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
            504, f"no answer within the {state.settings.request_timeout:g} s the server allows a request"
        ) from None
    finally:
        state.in_flight -= 1


async def answer(request: Request, state: ServingState, top: int) -> JSONResponse:
    """Reads the request's images, brings them to MNIST's form and predicts them in a batch."""
    batcher, class_names = state.batcher, state.class_names
    with batcher.expecting():  # a batch forming now waits for this request
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request, state.max_body)
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
        logits_soon = batcher.submit(images)
    logits = await logits_soon
    records = prediction_records(class_names, names, logits, top=top)
    for record, image in zip(records, images, strict=True):
        record["image"] = np.round(image.astype(np.float64), 4).tolist()  # short decimals
    return JSONResponse({"classes": class_names, "predictions": records})
