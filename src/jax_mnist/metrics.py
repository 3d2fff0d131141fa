"""Per-class metrics and averaged predictions from logits, in NumPy alone (reports read them
without JAX)."""

from __future__ import annotations

from typing import Any

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, np.float64)))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` of a classification, ``[num_classes, num_classes]``."""
    index = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Per-class accuracy and confusion matrix (the loss and accuracy are summed on the device,
    by :func:`jax_mnist.steps.eval_step`).

    Args:
      logits: float ``[N, C]``.
      labels: int ``[N]``.

    Returns:
      ``per_class_accuracy`` (list of C) and ``confusion`` (C x C nested list, rows true
      labels, columns predictions).
    """
    confusion = confusion_matrix(np.asarray(labels, np.int64), np.asarray(logits).argmax(-1), num_classes)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {"per_class_accuracy": per_class.tolist(), "confusion": confusion.tolist()}


def average_predictions(logits: list[np.ndarray]) -> np.ndarray:
    """Log of the mean softmax probabilities of several ``[N, C]`` logits: logits ``[N, C]``
    of the averaged prediction (an ensemble, or test-time augmentation)."""
    return np.log(np.mean([softmax(x) for x in logits], axis=0) + 1e-12)
