"""Evaluating trained models: metrics from logits, restoring runs, ensembles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jax_mnist.config import Config
from jax_mnist.errors import UserError
from jax_mnist.inference import InferenceModel, load_model, logits_metrics
from jax_mnist.metrics import average_predictions, class_metrics


def evaluate_runs(
    workdirs: list[str | Path],
    which: str | int = "best",
    *,
    split: str = "test",
    tta: bool = False,
    data_dir: str | None = None,
    warn=print,
) -> dict[str, Any]:
    """Metrics of each run on the test or validation split and, for several runs, of their ensemble.

    The ensemble averages the members' softmax probabilities. Loss and accuracy are the
    training step's cross-entropy and the correct count, summed on the device
    (:func:`~jax_mnist.steps.eval_step`); NumPy adds the per-class accuracy and the confusion
    matrix.

    Args:
      split: ``test``, or ``val`` for the validation split the runs held out in training
        (the place to decide on settings such as ``tta``); all runs must share it.
      tta: average each model's probabilities over one-pixel shifts (:data:`TTA_SHIFTS`).

    Returns:
      ``{"split", "tta", "members": [{"workdir", "step", **metrics}, ...], "ensemble": metrics
      or None}``, metrics ``loss``, ``accuracy``, ``per_class_accuracy`` and ``confusion``.
    """
    runs = [load_model(w, which, warn=warn) for w in workdirs]
    datasets = {run.config.dataset for run in runs}
    if len(datasets) > 1:
        raise UserError(
            f"runs trained on different datasets ({', '.join(sorted(datasets))}) cannot be evaluated together"
        )
    config = runs[0].config
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    images, labels = _split_arrays(config, runs, split)
    num_classes = runs[0].num_classes
    members, member_logits = [], []
    for run in runs:
        logits, metrics = run.evaluate(images, labels, tta=tta)
        member_logits.append(logits)
        members.append(
            {
                "workdir": str(run.workdir),
                "step": run.meta["step"],
                "model": run.config.model,
                **metrics,
                **class_metrics(logits, labels, num_classes),
            }
        )
    ensemble = None
    if len(runs) > 1:
        logits = average_predictions(member_logits)
        ensemble = {
            **logits_metrics(logits, labels, num_classes),
            **class_metrics(logits, labels, num_classes),
        }
    return {
        "dataset": config.dataset,
        "split": split,
        "tta": tta,
        "class_names": list(runs[0].class_names),
        "members": members,
        "ensemble": ensemble,
    }


def _split_arrays(config: Config, runs: list[InferenceModel], split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images ``[N, 28, 28]`` and labels ``[N]`` of ``split`` (``test`` or ``val``)."""
    from jax_mnist.data import load_dataset
    from jax_mnist.data.datasets import split_validation

    arrays = load_dataset(config, test=split == "test")
    if split == "test":
        return arrays.test_split()
    holdouts = {(run.config.val_size, run.config.validation_seed) for run in runs}
    if len(holdouts) > 1:
        raise UserError(
            "--split val: these runs held out different validation images (their --val-seed, or --seed "
            "where no --val-seed was given, or --val-size differ), so one's validation images trained "
            "another; evaluate them with --split test, or train them with one --val-seed"
        )
    val_size, seed = holdouts.pop()
    if not val_size:
        raise UserError(f"--split val: {runs[0].workdir} trained without a validation split (--val-size 0)")
    _, _, val_images, val_labels = split_validation(arrays.train_images, arrays.train_labels, val_size, seed)
    return val_images, val_labels


def format_metrics(name: str, metrics: dict[str, Any], class_names: list[str], split: str = "test") -> str:
    """A human-readable block: loss, accuracy, per-class accuracy, confusion matrix."""
    lines = [f"{name}: {split} loss {metrics['loss']:.4f}, {split} accuracy {100 * metrics['accuracy']:.2f}%"]
    lines.append(
        "per-class accuracy: "
        + "  ".join(
            f"{c}: {100 * a:.1f}%" for c, a in zip(class_names, metrics["per_class_accuracy"], strict=True)
        )
    )
    width = max(5, *(len(c) for c in class_names))
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * width + "".join(f"{c[:width]:>{width + 1}}" for c in class_names))
    for c, row in zip(class_names, metrics["confusion"], strict=True):
        lines.append(f"{c[:width]:>{width}}" + "".join(f"{v:>{width + 1}}" for v in row))
    return "\n".join(lines)
