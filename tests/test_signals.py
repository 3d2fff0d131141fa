"""A second SIGINT or SIGTERM ends ``jax-mnist train`` at once, whatever the loop is doing.

(A first signal that the loop cannot act on, in a collective that never returns, is tested with
two processes in ``test_distributed.py``.)
"""

from __future__ import annotations

import signal
import time

import pytest
from helpers import start_cli

# Chunks of 128 steps (one epoch, about 3 s): the main thread spends its time waiting in XLA,
# where Python's own signal handlers never run.
FLAGS = ["--train-size", "8192", "--val-size", "512", "--batch-size", "64", "--epochs", "50"]
FLAGS += ["--log-every", "128", "--eval-batch-size", "512"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once(tmp_path, signum):
    workdir = tmp_path / "run"
    proc = start_cli("train", *FLAGS, "--workdir", str(workdir))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not proc.stdout.readline().startswith("Epoch 2 done"):
            pass
        time.sleep(0.5)  # the loop has checked for signals, and the next chunk is under way
        start = time.monotonic()
        proc.send_signal(signum)
        time.sleep(0.3)  # a signal sent while the same one is still pending would be merged with it
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=30)
        took = time.monotonic() - start
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == (
        f"jax-mnist: {name} again: stopped at once, without saving a checkpoint. "
        f"Resume from the last one with: jax-mnist train --workdir {workdir} --resume"
    )
    assert "Traceback" not in err and took < 10
