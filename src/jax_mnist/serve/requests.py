"""What a prediction request sends, read and checked: its body, an upload, JSON arrays.

Each reader turns bad input into an :class:`ApiError` with a status and one line; the app
answers it as ``{"error": ...}``. Images go through the same functions as ``jax-mnist
predict`` (:func:`~jax_mnist.predict.decode_image`, :func:`~jax_mnist.predict.to_mnist_form`).
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
from fastapi import Request
from PIL import Image

from jax_mnist.predict import decode_image, to_mnist_form
from jax_mnist.serve.schema import MAX_IMAGES

# Inputs at most this large are preprocessed in the event loop (see small_image).
SMALL_BYTES = 64 * 1024
SMALL_PIXELS = 300 * 300
# A body over the limit is still read (and dropped) up to this many bytes, so the client,
# which sends its whole body before it reads the answer, receives the 413 rather than a reset.
DRAIN_BYTES = 256 * 1024 * 1024


class ApiError(Exception):
    """A request the server refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (counted as it streams:
    no more than ``limit`` bytes are kept)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_BYTES:  # past the limit the rest is read and dropped, up to here
            break
    if size > limit:
        raise ApiError(413, f"the request body is larger than the {limit:,} bytes accepted")
    return b"".join(chunks)


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """An uploaded image file -> MNIST's form, float32 ``[1, 28, 28]``."""
    if not data:
        raise ApiError(400, f"{name}: the image file is empty")
    return to_mnist_form(decode_image(io.BytesIO(data), name=name), name=name)[None]


def arrays_from_json(body: bytes) -> tuple[list[str], list[np.ndarray]]:
    """``{"image": [[...]]}`` or ``{"images": [[[...]]], ...}`` -> names and 2-D arrays."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(payload, dict) or ("image" in payload) == ("images" in payload):
        raise ApiError(
            400, 'expected a JSON object with "image" (a 2-D array) or "images" (a list of 2-D arrays)'
        )
    if "image" in payload:
        names, values = ["image"], [payload["image"]]
    else:
        values = payload["images"]
        if not isinstance(values, list) or not values:
            raise ApiError(400, '"images": expected a non-empty list of 2-D arrays')
        names = [f"images[{i}]" for i in range(len(values))]
    if len(values) > MAX_IMAGES:
        raise ApiError(400, f'"images": at most {MAX_IMAGES} images per request, got {len(values)}')
    arrays = []
    for name, value in zip(names, values, strict=True):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):  # ragged rows
            raise ApiError(
                400, f"{name}: expected a 2-D array of numbers with rows of equal length"
            ) from None
        if array.dtype.kind not in "iuf":
            found = {"U": "text", "b": "true/false", "O": "null or mixed values"}.get(
                array.dtype.kind, "values"
            )
            raise ApiError(400, f"{name}: expected a 2-D array of numbers, found {found}")
        if array.ndim != 2:
            raise ApiError(400, f"{name}: expected a 2-D array [H, W], got shape {list(array.shape)}")
        arrays.append(array)
    return names, arrays


def small_image(data: bytes) -> bool:
    """Whether an image file is small enough to preprocess in the event loop (about a
    millisecond) rather than in a thread, whose Python code would compete with the loop."""
    if len(data) > SMALL_BYTES:
        return False
    # A small file can hold a huge image: read its size from the header. PNG's is at a fixed
    # place; other formats are opened (reading the header only), which costs more.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width * height <= SMALL_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height <= SMALL_PIXELS
    except Exception:  # not an image: decode_image will say so, quickly
        return True


def mnist_form_all(names: list[str], arrays: list[np.ndarray]) -> np.ndarray:
    return np.stack([to_mnist_form(a, name=n) for n, a in zip(names, arrays, strict=True)])


async def form_file(request: Request, body: bytes) -> tuple[str, bytes]:
    """The first file of a multipart/form-data body already read into ``body``."""

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form(max_files=1, max_fields=16)
    try:
        for value in form.values():
            if not isinstance(value, str):  # an UploadFile
                return value.filename or "upload", await value.read()
    finally:
        await form.close()
    raise ApiError(
        400, "the multipart form holds no file: send the image as a file field, e.g. -F file=@digit.png"
    )
