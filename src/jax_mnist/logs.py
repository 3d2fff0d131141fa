"""What a run tells the user and writes down: the console, ``metrics.jsonl`` and TensorBoard.

The console shows either a live progress bar per epoch (on a terminal, with ``rich``) or the
seed's plain lines (``Epoch E, Loss: L``), which hold no control characters and suit log
files and CI. ``metrics.jsonl`` gets one JSON record per log point, epoch and test
evaluation; TensorBoard event files in the run directory get the same numbers as scalars,
written by tensorboardX (neither TensorFlow nor ``tensorboard`` is needed). Only the main process (process 0) prints and writes; the others stay quiet.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from jax_mnist.config import PROGRESS_MODES
from jax_mnist.rundir import write_atomically

_event_file_ids = itertools.count()  # two writers in one process and second get distinct files


def use_progress_bar(mode: str, stream: TextIO) -> bool:
    """Whether ``mode`` (auto, bar or plain) means a live bar on ``stream``.

    ``auto`` draws a bar only when ``stream`` is a terminal that can take one (not
    ``TERM=dumb``); a pipe, a file or CI gets plain lines.
    """
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode must be one of {PROGRESS_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "bar"
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


class EventWriter:
    """Appends scalars to a TensorBoard event file in ``logdir``, through tensorboardX.

    tensorboardX's ``EventsWriter`` frames TensorBoard's records and its ``Event`` protos with
    protobuf alone (neither TensorFlow nor the ``tensorboard`` package is needed). It writes in
    the caller's thread, and each scalar is flushed at once: a write the disk refuses fails the
    step that logged it, in one line like any other write of the run, rather than in a writer
    thread (tensorboardX's ``SummaryWriter``). The file opens on the first scalar, so a run
    that fails early leaves none.

    Args:
      logdir: the directory of the event file (the run directory).
      start_step: the step a resumed run goes on from; TensorBoard then drops what an
        earlier attempt logged after it (a ``SessionLog.START`` event at ``start_step + 1``).
    """

    def __init__(self, logdir: Path, *, start_step: int = 0):
        self.logdir = Path(logdir)
        self.start_step = start_step
        self._writer: Any = None  # tensorboardX's EventsWriter, opened at the first write

    def _open(self) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self.logdir.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads files named events.out.tfevents.<seconds>.<host>*, in name order;
        # the file is opened with "wb", so two writers within one second need distinct names:
        # the process and a counter, padded so that name order is creation order.
        suffix = f".{os.getpid()}.{next(_event_file_ids):06d}"
        self._writer = EventsWriter(str(self.logdir / "events"), suffix)
        # TensorBoard keeps what came before a START event's step and drops the rest from the
        # run; it ignores a run's first START, so every attempt writes one.
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._write(event_pb2.Event(step=self.start_step + 1, session_log=start))

    def _write(self, event: Any) -> None:
        event.wall_time = time.time()
        self._writer.write_event(event)
        self._writer.flush()

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Writes ``{tag: value}`` at ``step`` (None values are skipped) and flushes."""
        from tensorboardX.proto import event_pb2, summary_pb2

        if self._writer is None:
            self._open()
        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                for tag, value in values.items()
                if value is not None
            ]
        )
        self._write(event_pb2.Event(step=step, summary=summary))

    def close(self) -> None:
        """Closes the file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _EpochBar:
    """A ``rich`` progress bar over one epoch: steps, images/s, loss, time left."""

    def __init__(self, console, *, epoch: int, epochs: float, steps: int, done: int, batch_size: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.batch_size = batch_size
        self.progress = Progress(
            TextColumn(f"Epoch {epoch}/{epochs:g}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps · {task.fields[rate]} · loss {task.fields[loss]} ·"),
            TimeRemainingColumn(),
            TextColumn("left"),
            console=console,
            refresh_per_second=2,  # only the time left moves between log points
        )
        self.task = self.progress.add_task("", total=steps, completed=done, rate="- img/s", loss="-")
        self.done, self.t_last = done, time.perf_counter()
        self.progress.start()

    def update(self, done: int, loss: float) -> None:
        now = time.perf_counter()
        rate = (done - self.done) * self.batch_size / max(now - self.t_last, 1e-9)
        self.done, self.t_last = done, now
        self.progress.update(self.task, completed=done, loss=f"{loss:.4f}", rate=f"{rate:,.0f} img/s")

    def stop(self) -> None:
        self.progress.stop()


class RunLogger:
    """Shows training progress and records it in ``metrics.jsonl`` and TensorBoard files.

    Args:
      workdir: the run directory (``metrics.jsonl`` and event files go there); None writes
        no file.
      enabled: False on processes other than the main one.
      stream: where console output goes (default: standard output).
      progress: ``auto`` (a bar on a terminal, plain lines otherwise), ``bar`` or ``plain``.
      tensorboard: write TensorBoard event files into ``workdir``.

    The defaults (plain lines, no event files) suit library use; ``train_and_evaluate``
    passes the run's ``--progress`` and ``--tensorboard``.
    """

    def __init__(
        self,
        workdir: Path | None,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        progress: str = "plain",
        tensorboard: bool = False,
    ):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.metrics_path = Path(workdir) / "metrics.jsonl" if workdir is not None else None
        self.events = EventWriter(Path(workdir)) if enabled and tensorboard and workdir is not None else None
        self._console = None
        if enabled and use_progress_bar(progress, self.stream):
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False, markup=False, emoji=False)
        self._bar: _EpochBar | None = None
        self._epoch_first_step = 0

    def truncate_after(self, step: int) -> None:
        """Drops records logged after ``step``: a resumed run writes them again."""
        if self.events is not None:
            self.events.start_step = step
        if not (self.enabled and self.metrics_path and self.metrics_path.exists()):
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if _logged_by(line, step)]
        write_atomically(self.metrics_path, "".join(line + "\n" for line in kept))

    def record(self, record: dict[str, Any]) -> None:
        if self.enabled and self.metrics_path is not None:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def print(self, text: str) -> None:
        """A line on the console (above the progress bar while one is drawn)."""
        if not self.enabled:
            return
        if self._console is not None:
            self._console.print(text, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, *, epochs: float, steps: int, done: int = 0, batch_size: int) -> None:
        """An epoch (1-based) of ``steps`` steps begins, ``done`` of them already run (a resume)."""
        self._epoch_first_step = (epoch - 1) * steps
        if self._console is None:
            return
        self._stop_bar()
        self._bar = _EpochBar(
            self._console, epoch=epoch, epochs=epochs, steps=steps, done=done, batch_size=batch_size
        )
        atexit.register(self._stop_bar)  # an exception or Ctrl-C must not leave the cursor hidden

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            atexit.unregister(self._stop_bar)

    def log_step(self, *, epoch: int, step: int, loss: float, accuracy: float) -> None:
        """A log point inside an epoch: ``loss`` is the mean over the steps since the last one."""
        if self._bar is not None:
            self._bar.update(step - self._epoch_first_step, loss)
        else:
            self.print(f"Epoch {epoch}, Loss: {loss:.4f}")
        self.record({"kind": "train", "epoch": epoch, "step": step, "loss": loss, "accuracy": accuracy})
        if self.events is not None:
            self.events.scalars(step, {"train/loss": loss, "train/accuracy": accuracy})

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._stop_bar()
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
        if self.events is not None:
            self.events.scalars(
                r["step"],
                {
                    "epoch/train_loss": r["train_loss"],
                    "epoch/train_accuracy": r["train_accuracy"],
                    "epoch/val_loss": r.get("val_loss"),
                    "epoch/val_accuracy": r.get("val_accuracy"),
                    "epoch/images_per_s": r["images_per_s"],
                },
            )

    def log_test(self, record: dict[str, Any]) -> None:
        self._stop_bar()
        self.print(f"Test accuracy: {100 * record['test_accuracy']:.2f}%")
        self.record({"kind": "test", **record})
        if self.events is not None:
            self.events.scalars(
                record["step"], {"test/loss": record["test_loss"], "test/accuracy": record["test_accuracy"]}
            )

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop_bar()
        if self.events is not None:
            self.events.close()


def _logged_by(line: str, step: int) -> bool:
    """Whether a line of metrics.jsonl is a whole record of ``step`` or before. A last line
    cut short (the disk filled up while it was written) is no record."""
    try:
        return json.loads(line).get("step", 0) <= step
    except ValueError:
        return False
