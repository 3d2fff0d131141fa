"""What a run tells the user and writes down: console lines and ``metrics.jsonl``.

Only the main process (process 0) prints and writes; the others stay quiet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO


class RunLogger:
    """Prints training progress in the seed's format and appends records to ``metrics.jsonl``.

    Args:
      workdir: the run directory (``metrics.jsonl`` goes there); None writes no file.
      enabled: False on processes other than the main one.
      stream: where console lines go.
    """

    def __init__(self, workdir: Path | None, *, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.metrics_path = Path(workdir) / "metrics.jsonl" if workdir is not None else None

    def truncate_after(self, step: int) -> None:
        """Drops records logged after ``step``: a resumed run writes them again."""
        if not (self.enabled and self.metrics_path and self.metrics_path.exists()):
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def record(self, record: dict[str, Any]) -> None:
        if self.enabled and self.metrics_path is not None:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def log_step(self, *, epoch: int, step: int, loss: float, accuracy: float) -> None:
        """A log point inside an epoch: ``loss`` is the mean over the steps since the last one."""
        self.print(f"Epoch {epoch}, Loss: {loss:.4f}")
        self.record({"kind": "train", "epoch": epoch, "step": step, "loss": loss, "accuracy": accuracy})

    def log_epoch(self, record: dict[str, Any]) -> None:
        r = record
        val = (
            f", val loss {r['val_loss']:.4f}, val acc {100 * r['val_accuracy']:.2f}%"
            if r.get("val_accuracy") is not None
            else ""
        )
        self.print(
            f"Epoch {r['epoch']} done: train loss {r['train_loss']:.4f}, "
            f"train acc {100 * r['train_accuracy']:.2f}%{val}, "
            f"{r['epoch_time_s']:.1f}s, {r['images_per_s']:.0f} img/s"
        )
        self.record({"kind": "epoch", **record})

    def log_test(self, record: dict[str, Any]) -> None:
        self.print(f"Test accuracy: {100 * record['test_accuracy']:.2f}%")
        self.record({"kind": "test", **record})

    def close(self) -> None:
        pass
