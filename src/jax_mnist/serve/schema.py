"""The shapes of ``jax-mnist serve``'s requests and answers, as its OpenAPI schema states them.

FastAPI builds ``/openapi.json`` from these: the bodies ``POST /api/predict`` takes, the models
of its answers, and every refusal with its status. ``tests/test_serve_ops.py`` fuzzes the
running server against that schema, so what is declared here is what the server must answer.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

MAX_IMAGES = 256  # per request

# ---- what a prediction request may send

IMAGE_SCHEMA = {"type": "string", "format": "binary"}
PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {"file": IMAGE_SCHEMA}, "required": ["file"]}
        },
        "image/png": {"schema": IMAGE_SCHEMA},
        "image/jpeg": {"schema": IMAGE_SCHEMA},
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "number"}},
                        "description": "one grayscale image [H, W]",
                    },
                    "images": {
                        "type": "array",
                        "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                        "minItems": 1,
                        "maxItems": MAX_IMAGES,
                        "description": f"up to {MAX_IMAGES} grayscale images, each [H, W]",
                    },
                },
            },
            "example": {"image": [[0, 0, 0], [0, 255, 0], [0, 255, 0], [0, 0, 0]]},
        },
    },
}

# ---- what the answers look like (the OpenAPI schema; tests/test_serve_ops.py fuzzes against it)


class Status(BaseModel):
    status: str = Field(description="ok, ready, warming up, draining or failed")
    error: str | None = Field(None, description="why the warm-up failed")


class ErrorAnswer(BaseModel):
    error: str = Field(description="what is wrong, in one line")


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Row = Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], Field(min_length=28, max_length=28)]


class Prediction(BaseModel):
    input: str = Field(description="the upload's file name, image, or images[i]")
    prediction: int = Field(ge=0, description="the most likely class, an index into classes")
    label: str = Field(description="its name")
    probability: Probability
    probabilities: list[Probability] = Field(description="one per class")
    top: list[tuple[str, Probability]] = Field(description="the ?top= most likely: [label, probability]")
    image: Annotated[list[Row], Field(min_length=28, max_length=28)] = Field(
        description="the 28x28 image the model saw, white on black in [0, 1]"
    )


class PredictAnswer(BaseModel):
    classes: list[str]
    predictions: list[Prediction]


RETRY = {
    "headers": {
        "Retry-After": {
            "description": "seconds to wait before trying again",
            "schema": {"type": "integer", "minimum": 0},
        }
    }
}


def refusal(description: str, **extra) -> dict:
    """An OpenAPI response entry for a refusal with status-specific ``description``."""
    return {"model": ErrorAnswer, "description": description, **extra}


PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PredictAnswer,
        "description": "one prediction per image, with the 28x28 image the model saw",
        "content": {
            "application/json": {
                "example": {
                    "classes": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
                    "predictions": [
                        {
                            "input": "digit.png",
                            "prediction": 7,
                            "label": "7",
                            "probability": 0.998,
                            "probabilities": [0.0, 0.0, 0.001, 0.0, 0.0, 0.0, 0.0, 0.998, 0.0, 0.001],
                            "top": [["7", 0.998]],
                            "image": [[0.0] * 28] * 28,
                        }
                    ],
                }
            }
        },
    },
    400: refusal("not an image, empty, blank, NaN, wrong shape, malformed JSON"),
    413: refusal("the body is larger than the limit (10 MB)"),
    415: refusal("a content type that is neither an image, a form nor JSON"),
    422: refusal("a query parameter out of range (?top=)"),
    503: refusal("the server is full (--max-queue) or the model is still warming up", **RETRY),
    504: refusal("not answered within --request-timeout"),
}
