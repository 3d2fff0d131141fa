"""One real training run of the seed CNN through the CLI, as a user would run it."""

import json
import re

import pytest


@pytest.mark.slow
def test_one_epoch_of_the_seed_cnn_reaches_98_percent(seed_cnn_cli_run):
    workdir, result = seed_cnn_cli_run  # jax-mnist train --epochs 1 --workdir DIR
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(bool(re.fullmatch(r"Epoch 1, Loss: \d+\.\d+", line)) for line in lines) == 5
    assert any(
        line.startswith("Epoch 1 done: train loss") and "val acc" in line and "img/s" in line
        for line in lines
    )
    accuracy = float(re.search(r"Test accuracy: (\d+\.\d+)%", result.stdout).group(1))
    assert accuracy >= 98.0, result.stdout
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "test" and abs(100 * record["test_accuracy"] - accuracy) < 0.01
