"""The console, metrics.jsonl and TensorBoard files of a run, read back with TensorBoard's reader."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import time

import pytest
from helpers import run_cli, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.backend.event_processing.plugin_event_accumulator import (
    EventAccumulator as PluginEventAccumulator,
)
from tensorboard.util import tensor_util

from jax_mnist.logs import EventWriter, RunLogger, use_progress_bar

TINY_FLAGS = [
    f"--{name.replace('_', '-')}={value}"
    for name, value in tiny_config().to_dict().items()
    if name in ("train_size", "val_size", "batch_size", "epochs", "log_every", "eval_batch_size")
]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny run through the CLI with standard output a pipe: (workdir, stdout)."""
    workdir = tmp_path_factory.mktemp("logs") / "run"
    result = run_cli("train", "--workdir", str(workdir), *TINY_FLAGS)
    assert result.returncode == 0, result.stderr
    return workdir, result.stdout


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_piped_output_is_the_seed_format_without_control_characters(cli_run):
    _, stdout = cli_run
    assert "\x1b" not in stdout and "\r" not in stdout
    lines = stdout.splitlines()
    # 2 epochs of 16 steps, a line every 8 steps, an epoch summary after each, the test at the end
    patterns = [r"Epoch 1, Loss: \d+\.\d{4}"] * 2 + [r"Epoch 1 done: train loss .*img/s"]
    patterns += [r"Epoch 2, Loss: \d+\.\d{4}"] * 2 + [r"Epoch 2 done: train loss .*img/s"]
    patterns += [r"Test accuracy: \d+\.\d\d%"]
    assert len(lines) == len(patterns), stdout
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), line


def test_metrics_jsonl_has_one_record_per_epoch_and_log_point(cli_run):
    workdir, stdout = cli_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["step"] for r in epochs] == [16, 32]
    fields = {"step", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s"}
    for r in epochs:
        assert fields | {"images_per_s", "best_val_accuracy"} <= set(r)
        assert 0 <= r["val_accuracy"] <= 1 and r["train_loss"] > 0
    assert [r["step"] for r in records if r["kind"] == "train"] == [8, 16, 24, 32]
    (test,) = [r for r in records if r["kind"] == "test"]
    assert f"Test accuracy: {100 * test['test_accuracy']:.2f}%" in stdout


def test_tensorboard_reads_the_logged_scalars(cli_run):
    workdir, _ = cli_run
    (event_file,) = workdir.glob("events.out.tfevents.*")
    first = next(iter(EventFileLoader(str(event_file)).Load()))
    assert first.file_version == "brain.Event:2"

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    got = scalars(workdir)
    train = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    (test,) = [r for r in records if r["kind"] == "test"]
    expected = {
        "train/loss": [(r["step"], r["loss"]) for r in train],
        "train/accuracy": [(r["step"], r["accuracy"]) for r in train],
        "epoch/val_accuracy": [(r["step"], r["val_accuracy"]) for r in epochs],
        "epoch/train_loss": [(r["step"], r["train_loss"]) for r in epochs],
        "test/accuracy": [(test["step"], test["test_accuracy"])],
        "test/loss": [(test["step"], test["test_loss"])],
    }
    for tag, values in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in values], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in values], rel=1e-6), tag
    assert {"epoch/val_loss", "epoch/train_accuracy", "epoch/images_per_s"} <= set(got)


def test_no_tensorboard_writes_no_event_file(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False, stream=io.StringIO())
    logger.log_step(epoch=1, step=8, loss=0.5, accuracy=0.9)
    logger.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.jsonl").exists()


def test_only_the_main_process_writes(tmp_path):
    stream = io.StringIO()
    logger = RunLogger(tmp_path, enabled=False, tensorboard=True, progress="bar", stream=stream)
    logger.start_epoch(1, epochs=1, steps=16, batch_size=64)
    logger.log_step(epoch=1, step=8, loss=0.5, accuracy=0.9)
    logger.log_test({"step": 16, "test_loss": 0.3, "test_accuracy": 0.9})
    logger.close()
    assert stream.getvalue() == "" and not list(tmp_path.iterdir())


def test_resumed_run_replaces_what_tensorboard_saw_after_the_checkpoint(tmp_path):
    first = EventWriter(tmp_path)
    for step in (10, 20, 30):
        first.scalars(step, {"train/loss": 1.0})
    first.close()
    resumed = EventWriter(tmp_path, start_step=20)
    resumed.scalars(30, {"train/loss": 2.0})
    resumed.close()
    assert scalars(tmp_path)["train/loss"] == [(10, 1.0), (20, 1.0), (30, 2.0)]
    # the loader behind the TensorBoard app
    acc = PluginEventAccumulator(str(tmp_path))
    acc.Reload()
    values = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors("train/loss")]
    assert values == [(10, 1.0), (20, 1.0), (30, 2.0)]


def test_scalars_reach_the_file_before_the_writer_closes(tmp_path):
    """A run killed at once (SIGKILL, a lost machine) keeps what it logged a second before."""
    writer = EventWriter(tmp_path)
    writer.scalars(10, {"train/loss": 0.5, "train/accuracy": None})
    deadline = time.monotonic() + 10
    while "train/loss" not in scalars(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scalars(tmp_path) == {"train/loss": [(10, 0.5)]}
    writer.close()


def test_event_files_are_written_without_the_tensorboard_package(tmp_path):
    """The base install has no ``tensorboard``: logs.py writes through tensorboardX alone."""
    script = (
        "import sys; sys.modules['tensorboard'] = None\n"  # any import of it now fails
        "from pathlib import Path\n"
        "from jax_mnist.logs import RunLogger\n"
        "with RunLogger(Path(sys.argv[1]), tensorboard=True) as logger:\n"
        "    logger.log_step(epoch=1, step=8, loss=0.5, accuracy=0.875)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert scalars(tmp_path) == {"train/loss": [(8, 0.5)], "train/accuracy": [(8, 0.875)]}


def test_progress_mode_auto_draws_a_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    assert not use_progress_bar("auto", io.StringIO())
    assert use_progress_bar("bar", io.StringIO()) and not use_progress_bar("plain", io.StringIO())
    controller, terminal = pty.openpty()
    with os.fdopen(terminal, "w") as tty:
        assert use_progress_bar("auto", tty)
        assert not use_progress_bar("plain", tty)
        monkeypatch.setenv("TERM", "dumb")
        assert not use_progress_bar("auto", tty)
    os.close(controller)


def _drain(fd) -> bytes:
    import select

    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def test_terminal_gets_a_progress_bar_with_loss_and_images_per_second(tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    controller, terminal = pty.openpty()
    with os.fdopen(terminal, "w") as tty:
        logger = RunLogger(tmp_path, stream=tty, progress="auto", tensorboard=False)
        logger.start_epoch(1, epochs=2, steps=16, batch_size=64)
        logger.log_step(epoch=1, step=8, loss=0.4321, accuracy=0.9)
        logger.log_step(epoch=1, step=16, loss=0.3210, accuracy=0.9)
        logger.log_epoch(
            {
                "epoch": 1,
                "step": 16,
                "train_loss": 0.4,
                "train_accuracy": 0.9,
                "epoch_time_s": 1.0,
                "images_per_s": 1024.0,
            }
        )
        logger.close()
        tty.flush()
        out = _drain(controller).decode()
    os.close(controller)
    assert "\x1b[" in out  # drawn and redrawn in place
    assert "Epoch 1/2" in out and "16/16" in out and "loss 0.3210" in out and "img/s" in out
    assert "Epoch 1, Loss:" not in out  # the bar replaces the plain lines
    assert "Epoch 1 done: train loss 0.4000, train acc 90.00%, 1.0s, 1024 img/s" in out
