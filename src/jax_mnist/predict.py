"""Predicting digits in image files: bringing any picture of a digit to MNIST's form.

MNIST digits are white on black, fitted into a 20x20 box keeping their aspect ratio, and
placed in a 28x28 image so that their centre of mass is at the centre. A photo or scan of a
digit on paper is dark on light, of any size, with the digit anywhere; :func:`to_mnist_form`
brings both kinds to MNIST's form so the model sees what it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from jax_mnist.errors import UserError
from jax_mnist.metrics import softmax

if TYPE_CHECKING:
    from jax_mnist.inference import InferenceModel

# A pixel counts as ink when it is at least this fraction of the brightest ink pixel.
INK_THRESHOLD = 0.2


class ImageError(UserError):
    """An input that is not an image, is empty, or shows nothing to recognize."""


def _border(img: np.ndarray) -> np.ndarray:
    return np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])


def to_mnist_form(gray: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Brings a grayscale image to MNIST's form.

    Args:
      gray: ``[H, W]`` grayscale, any numeric dtype, either polarity.
      name: how to name the input in errors.

    Returns:
      float32 ``[28, 28]`` in [0, 1], white digit on black, fitted in 20x20 and centred by
      centre of mass.
    """
    gray = np.asarray(gray)
    if (
        gray.dtype != bool
        and not np.issubdtype(gray.dtype, np.integer)
        and not np.issubdtype(gray.dtype, np.floating)
    ):
        raise ImageError(f"{name}: expected pixel values (real numbers), got an array of {gray.dtype}")
    img = gray.astype(np.float64)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ImageError(f"{name}: expected a 2-D grayscale image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise ImageError(f"{name}: the image holds values that are not finite numbers (NaN or infinity)")
    lo, hi = np.min(img), np.max(img)
    if hi - lo < 1e-6 * max(abs(hi), 1.0):
        raise ImageError(f"{name}: the image is blank (every pixel is {lo:g}); nothing to recognize")
    img = (img - lo) / (hi - lo)
    if np.median(_border(img)) > 0.5:  # light background: a dark digit on paper
        img = 1.0 - img
    img = np.clip(img - np.median(_border(img)), 0.0, None)  # the background becomes 0
    if img.max() <= 0:
        raise ImageError(f"{name}: no digit found (the image has no contrast against its background)")
    img = img / img.max()

    rows, cols = np.nonzero(img >= INK_THRESHOLD)
    img = img[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = img.shape
    scale = 20.0 / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = Image.fromarray((img * 255).astype(np.uint8)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    digit = np.asarray(resized, np.float32) / 255.0

    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - new_h) // 2, (28 - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = digit
    # Shift so the centre of mass lands at the centre, as MNIST's creators did.
    total = canvas.sum()
    ys, xs = np.indices(canvas.shape)
    dy = round(13.5 - (ys * canvas).sum() / total)
    dx = round(13.5 - (xs * canvas).sum() / total)
    dy = int(np.clip(dy, -top, 28 - top - new_h))
    dx = int(np.clip(dx, -left, 28 - left - new_w))
    return np.roll(canvas, (dy, dx), axis=(0, 1))


def load_inputs(path: Path) -> list[tuple[str, np.ndarray]]:
    """Reads one input file into named grayscale images ``[H, W]``.

    ``.npy`` files hold one image ``[H, W]`` or several ``[N, H, W]`` (read without
    pickle); any other file is opened as an image with Pillow.
    """
    name = str(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: the file is empty")
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ImageError(f"{name}: not a readable NumPy array file ({e})".splitlines()[0]) from None
        if array.ndim == 2:
            return [(name, array)]
        if array.ndim == 3:
            return [(f"{name}[{i}]", a) for i, a in enumerate(array)]
        raise ImageError(f"{name}: expected an array of shape [H, W] or [N, H, W], got {array.shape}")
    return [(name, decode_image(path, name=name))]


# Larger images are refused before they are decoded (a small file can hold a huge image).
MAX_IMAGE_PIXELS = 40_000_000


def decode_image(source: Path | BinaryIO, *, name: str = "image") -> np.ndarray:
    """Decodes an image file (PNG, JPEG, BMP, GIF, TIFF, ...) into grayscale ``[H, W]`` uint8.

    Transparent pixels count as white paper. Raises :class:`ImageError` for anything that is
    not a readable image, or one of more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"{name}: the image is {image.width}x{image.height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS:,} accepted"
                )
            image.load()
            if image.mode in ("RGBA", "LA") or "transparency" in image.info:
                # Transparent pixels count as background: composite on the image's own
                # dominant background would be guesswork, white paper is the common case.
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(background, image.convert("RGBA")).convert("L"))
            return np.asarray(image.convert("L"))
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, ...)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: the image is too large to decode") from None
    except OSError as e:
        raise ImageError(f"{name}: damaged image file ({e})".splitlines()[0]) from None


def predict_images(
    model: InferenceModel, names: list[str], images: np.ndarray, *, top: int = 1
) -> list[dict[str, Any]]:
    """Predictions for images already in MNIST's form.

    Args:
      model: the restored model.
      names: one name per image, echoed in the records.
      images: float ``[N, 28, 28]`` in [0, 1], as :func:`to_mnist_form` returns.
      top: how many of the most likely classes each record lists.

    Returns:
      One record per image, as :func:`prediction_records` makes them.
    """
    return prediction_records(model.class_names, names, model.predict_logits(images), top=top)


def prediction_records(
    class_names: tuple[str, ...] | list[str], names: list[str], logits: np.ndarray, *, top: int = 1
) -> list[dict[str, Any]]:
    """One record per image from the model's logits ``[N, C]``.

    Each record holds ``input`` (the name), ``prediction`` (the class index), ``label`` (its
    name), ``probability``, ``probabilities`` (all classes), ``top`` (the ``top`` best as
    ``[label, probability]``).
    """
    probabilities = softmax(logits)
    records = []
    for name, p in zip(names, probabilities, strict=True):
        best = np.argsort(-p, kind="stable")[:top]
        records.append(
            {
                "input": name,
                "prediction": int(best[0]),
                "label": class_names[best[0]],
                "probability": float(p[best[0]]),
                "probabilities": [float(x) for x in p],
                "top": [[class_names[i], float(p[i])] for i in best],
            }
        )
    return records


def predict_files(
    workdir: str | Path, paths: list[str | Path], *, which: str | int = "best", top: int = 1, warn=print
) -> tuple[list[dict[str, Any]], list[str]]:
    """Predicts the class of every image in ``paths`` with the model of run ``workdir``.

    Returns:
      ``(predictions, errors)``: one record per image as :func:`predict_images` makes them,
      and one line per input that could not be read. A bad input never stops the others.
    """
    from jax_mnist.inference import load_model

    model = load_model(workdir, which, warn=warn)
    names, images, errors = [], [], []
    for path in paths:
        try:
            for name, gray in load_inputs(Path(path)):
                images.append(to_mnist_form(gray, name=name))
                names.append(name)
        except ImageError as e:
            errors.append(str(e))
    predictions = predict_images(model, names, np.stack(images), top=top) if images else []
    return predictions, errors
