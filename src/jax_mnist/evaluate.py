"""Classification metrics from logits."""

from __future__ import annotations

from typing import Any

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix.

    Args:
      logits: float ``[N, C]``.
      labels: int ``[N]``.

    Returns:
      ``loss`` (mean cross-entropy), ``accuracy``, ``per_class_accuracy`` (list of C) and
      ``confusion`` (C x C nested list, rows true labels, columns predictions).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    predictions = logits.argmax(-1)
    loss = -log_softmax(logits)[np.arange(len(labels)), labels].mean()
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {
        "loss": float(loss),
        "accuracy": float((predictions == labels).mean()),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.tolist(),
    }
