"""Run directories read back: their config, metrics and test predictions, and the list of runs.

Everything here reads what a run directory holds (``config.json``, ``metrics.jsonl``,
``test_predictions.npz``) and nothing else, so :mod:`jax_mnist.report` can draw a report long
after training, on another machine, without the checkpoints; ``jax-mnist runs`` prints
:func:`format_runs` of :func:`summarize_runs`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jax_mnist.config import Config
from jax_mnist.errors import UserError


@dataclasses.dataclass
class Run:
    """What a run directory holds, read back.

    Attributes:
      path: the run directory.
      config: its ``config.json``.
      records: the records of its ``metrics.jsonl`` in order (empty if there is none yet).
    """

    path: Path
    config: Config
    records: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def epochs(self) -> list[dict[str, Any]]:
        """One record per finished epoch, in order."""
        return [r for r in self.records if r.get("kind") == "epoch"]

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The log points inside epochs (``kind: train``)."""
        return [r for r in self.records if r.get("kind") == "train"]

    @property
    def test(self) -> dict[str, Any] | None:
        """The final test evaluation, or None if the run has not finished."""
        tests = [r for r in self.records if r.get("kind") == "test"]
        return tests[-1] if tests else None

    @property
    def best_val_accuracy(self) -> float | None:
        values = [r["val_accuracy"] for r in self.epochs if r.get("val_accuracy") is not None]
        return max(values, default=None)


def load_run(path: str | Path) -> Run:
    """Reads the config and metrics of the run directory ``path``.

    Raises:
      UserError: ``path`` is not a run directory, or one of its files is unreadable.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not config_path.is_file():
        raise UserError(f"{path}: not a run directory (no config.json)")
    try:
        values = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: cannot read: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"{config_path}: must hold a JSON object of settings")
    config = Config.from_dict(values, source=str(config_path))
    return Run(path, config, read_metrics(path / "metrics.jsonl"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (none if it does not exist)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not a JSON record: {e}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


def load_predictions(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """Test logits ``[N, C]`` and labels ``[N]`` of a finished run, or None if it has none."""
    path = run.path / "test_predictions.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            logits, labels = f["logits"], f["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot read test predictions: {e}") from None
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise UserError(f"{path}: logits {logits.shape} and labels {labels.shape} do not match")
    return logits, labels


def display_names(runs: list[Run]) -> list[str]:
    """Directory names, or paths where two runs share a name."""
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        return [str(run.path) for run in runs]
    return names


def percent(value: float | None) -> str:
    """``0.9912`` -> ``99.12%``; None -> ``-``."""
    return "-" if value is None else f"{100 * value:.2f}%"


# -- the list of runs


@dataclasses.dataclass
class RunSummary:
    """One line of ``jax-mnist runs``."""

    path: Path
    model: str = "?"
    preset: str = "?"
    epochs_done: int = 0
    epochs: float = 0
    best_val_accuracy: float | None = None
    test_accuracy: float | None = None
    problem: str | None = None


def find_runs(root: str | Path) -> list[Path]:
    """The run directories (holding a ``config.json``) under ``root``, in name order.

    A run's own subdirectories (checkpoints) are not searched.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory (runs go under runs/ unless --workdir says otherwise)")
    found = []
    for directory, subdirs, files in os.walk(root):
        if "config.json" in files:
            found.append(Path(directory))
            subdirs.clear()
        else:
            subdirs.sort()
    return sorted(found)


def summarize_runs(root: str | Path) -> list[RunSummary]:
    """A summary of each run under ``root``; an unreadable run says why instead of failing."""
    summaries = []
    for path in find_runs(root):
        try:
            run = load_run(path)
        except UserError as e:
            summaries.append(RunSummary(path, problem=str(e)))
            continue
        test = run.test
        summaries.append(
            RunSummary(
                path,
                model=run.config.model,
                preset=run.config.preset,
                epochs_done=len(run.epochs),
                epochs=run.config.epochs,
                best_val_accuracy=run.best_val_accuracy,
                test_accuracy=test.get("test_accuracy") if test else None,
            )
        )
    return summaries


def format_runs(summaries: list[RunSummary], root: str | Path) -> str:
    """The table ``jax-mnist runs`` prints: one run a line, paths relative to ``root``."""
    header = ("run", "model", "preset", "epochs", "best val acc", "test acc")
    rows = []
    for s in summaries:
        name = os.path.relpath(s.path, root)
        if s.problem:
            rows.append((name, "?", "?", "?", "?", s.problem))
            continue
        rows.append(
            (
                name,
                s.model,
                s.preset,
                f"{s.epochs_done}/{s.epochs:g}",
                percent(s.best_val_accuracy),
                percent(s.test_accuracy),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))]
        lines.append("  ".join([*cells, r[-1].rjust(max(len(header[-1]), 8))]).rstrip())
    return "\n".join(lines)
