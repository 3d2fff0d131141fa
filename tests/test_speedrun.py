"""The speed run: fractional epochs, the small CNN, and tune's second objective (training cost).

The search runs for real: a two-objective Optuna study of tiny trials on the bundled MNIST,
through the CLI in a subprocess.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, tiny_config

from jax_mnist import optim
from jax_mnist.config import PRESETS, Config, preset_config
from jax_mnist.models import abstract_model, flops_per_image
from jax_mnist.train import train_and_evaluate


def records(workdir: Path, kind: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_a_fractional_run_ends_part_way_through_its_last_epoch(tmp_path):
    # 16 steps an epoch: 1.5 epochs are 24 steps, the second epoch evaluated after its 8th.
    final = train_and_evaluate(tiny_config(epochs=1.5, model="smallcnn"), tmp_path / "run")
    epochs = records(tmp_path / "run", "epoch")
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 16), (2, 24)]
    assert final["step"] == 24
    assert all(r["val_accuracy"] is not None for r in epochs)
    assert math.isclose(epochs[1]["images_per_s"] * epochs[1]["epoch_time_s"], 8 * 64, rel_tol=1e-6)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [16, 24]


def test_the_schedule_spans_the_steps_a_fractional_run_takes():
    config = Config(schedule="onecycle", lr=1e-2, epochs=1.5)
    schedule = optim.create_schedule(config, steps_per_epoch=100)
    assert config.total_steps(100) == 150
    rates = np.array([float(schedule(s)) for s in range(151)])
    assert rates.argmax() == 45  # one-cycle peaks 30% into the run
    assert rates[150] < 1e-5 and rates[100] > 1e-3


def test_the_speedrun_preset_trains_the_small_cnn_on_every_training_image():
    assert "speedrun" in PRESETS
    config = preset_config("speedrun").validate()
    assert config.model.startswith("smallcnn") and config.val_size == 0
    seed_flops = flops_per_image(abstract_model("cnn"))
    flops = flops_per_image(abstract_model(config.model, width=config.width, depth=config.depth))
    assert flops < 0.5 * seed_flops


SPACE = """
lr = { type = "float", low = 1e-3, high = 1e-2, log = true }
epochs = { type = "float", low = 0.5, high = 1.5, step = 0.5 }
"""
TINY = [
    *("--model", "smallcnn", "--width", "8", "--train-size", "1024", "--val-size", "512"),
    *("--batch-size", "64", "--eval-batch-size", "512", "--log-every", "100", "--no-tensorboard"),
]


@pytest.mark.slow  # a real Optuna search through the CLI, as the other searches
def test_a_search_with_a_cost_target_minimizes_the_training_flops_to_reach_it(tmp_path):
    optuna = pytest.importorskip("optuna", reason="the tune tests need Optuna: pip install 'jax-mnist[tune]'")
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    study_dir = tmp_path / "study"
    args = ["tune", "--study", str(study_dir), "--trials", "3", "--space", str(space), "--cost-target", "0.5"]
    result = run_cli(*args, *TINY, "--progress", "plain")
    assert result.returncode == 0, result.stderr[-2000:]

    study = optuna.load_study(study_name="study", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    flops = flops_per_image(abstract_model("smallcnn", width=8))
    for trial in study.trials:
        accuracy, cost = trial.values
        curve = trial.user_attrs["curve"]  # [images trained on, validation accuracy] per evaluation
        assert accuracy == max(a for _, a in curve)
        # The cost counts the images up to the first evaluation at or above the target.
        images = next((n for n, a in curve if a >= 0.5), curve[-1][0])
        assert trial.user_attrs["reached"] == any(a >= 0.5 for _, a in curve)
        assert math.isclose(cost, images * flops / 1e9, rel_tol=1e-9)
        # Feasible (0 or below) once the target is reached: TPE ranks the others after.
        assert trial.constraints == {"short_of_target": pytest.approx(0.5 - accuracy)}
        steps = round(trial.params["epochs"] * 16)
        assert curve[-1][0] == steps * 64

    # The table ranks trials that reached the target by cost, and marks the Pareto front.
    assert "GFLOP to target" in result.stdout and "pareto" in result.stdout
    best_line = next(line for line in result.stdout.splitlines() if line.startswith("best: trial"))
    assert re.search(r"GFLOP of training (to first reach|without reaching) 50.00%", best_line)
    reached = sorted((t.values[1], t.number) for t in study.trials if t.user_attrs["reached"])
    if reached:
        assert best_line.startswith(f"best: trial {reached[0][1]},")
    assert (study_dir / "pareto.png").stat().st_size > 10_000
    assert "Pareto front" in (study_dir / "report.html").read_text()
    assert "GFLOP" in (study_dir / "best.toml").read_text()

    # Continuing the study with another objective is refused in one line.
    again = run_cli(*args[:-1], "0.6", *TINY)
    assert again.returncode != 0
    assert "--cost-target" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_a_cost_target_must_be_an_accuracy(tmp_path):
    result = run_cli("tune", "--study", str(tmp_path / "s"), "--trials", "1", "--cost-target", "99.1")
    assert result.returncode == 2 or result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "jax-mnist: error: --cost-target: must be a validation accuracy between 0 and 1, got 99.1"
    ]
