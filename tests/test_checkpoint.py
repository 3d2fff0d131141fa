"""Checkpoints on real files: exact round trips, exact resume, damage, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import run_cli, tiny_config

from jax_mnist.checkpoint import Checkpoints
from jax_mnist.errors import UserError
from jax_mnist.inference import load_model
from jax_mnist.train import abstract_train_state, create_setup, create_train_state, train_and_evaluate

TIMING_FIELDS = ("epoch_time_s", "images_per_s", "wall_time_s")


def records(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def latest_state(workdir):
    """The whole training state of a run's latest checkpoint."""
    with Checkpoints(workdir, read_only=True) as checkpoints:
        config = checkpoints.read_config()
        setup = create_setup(config, steps_per_epoch=1)  # shapes only: any length will do
        return checkpoints.restore(abstract_train_state(setup))[0]


def assert_same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_round_trip_is_exact(tmp_path):
    config = tiny_config()
    setup = create_setup(config, steps_per_epoch=16)
    state = create_train_state(setup)
    state = state.replace(step=state.step + 7)
    checkpoints = Checkpoints(tmp_path, keep=2)
    checkpoints.save(state, {"step": 7, "epoch": 0.4}, config, val_accuracy=0.5)
    restored, meta = checkpoints.restore(abstract_train_state(setup))
    assert meta["step"] == 7 and int(restored.step) == 7
    assert_same_tree(state, restored)
    assert checkpoints.read_config() == config


def test_stop_and_resume_equals_straight_run_bit_for_bit(tmp_path):
    straight = train_and_evaluate(tiny_config(epochs=3), tmp_path / "straight")
    train_and_evaluate(tiny_config(epochs=1), tmp_path / "resumed")
    resumed = train_and_evaluate(tiny_config(epochs=3), tmp_path / "resumed", resume=True)
    # The resumed run also keeps the test record of its first, 1-epoch part.
    first_part_test = next(r for r in records(tmp_path / "resumed") if r["kind"] == "test")
    assert first_part_test["step"] == 16
    assert records(tmp_path / "straight") == [
        r for r in records(tmp_path / "resumed") if r != first_part_test
    ]
    assert straight["test_loss"] == resumed["test_loss"]
    assert_same_tree(latest_state(tmp_path / "straight"), latest_state(tmp_path / "resumed"))


def test_checkpoint_every_steps_and_keep(tmp_path):
    # 16 steps per epoch: saves at every 5 steps and at each epoch end; keeps the last 4.
    train_and_evaluate(tiny_config(epochs=2, checkpoint_every_steps=5, keep=4), tmp_path / "a")
    checkpoints = Checkpoints(tmp_path / "a")
    assert checkpoints.steps() == [20, 25, 30, 32]
    assert checkpoints.steps("best") in ([16], [32])


def test_resume_refuses_changed_settings_but_allows_more_epochs(tmp_path):
    train_and_evaluate(tiny_config(epochs=1), tmp_path / "run")
    with pytest.raises(UserError, match=r"lr \(stored 0.001, given 0.01\)"):
        train_and_evaluate(tiny_config(epochs=2, lr=0.01), tmp_path / "run")
    final = train_and_evaluate(tiny_config(epochs=2), tmp_path / "run")
    assert final["step"] == 32


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train_and_evaluate(tiny_config(), tmp_path / "new", resume=True)


def _damage_latest(workdir, how):
    checkpoints = Checkpoints(workdir)
    latest = max(checkpoints.steps())
    step_dir = checkpoints.root / "latest" / str(latest) / "state"
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)
    if how == "truncate":
        # Every data file: how Orbax spreads the arrays over them depends on how it saved
        # (asynchronous saves write several), and a restore reads only the arrays it needs.
        biggest = max(p.stat().st_size for p in files)
        for p in files:
            if p.stat().st_size > biggest // 4:
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        for p in files:
            p.unlink()
    return latest


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, how, capsys):
    train_and_evaluate(tiny_config(epochs=2), tmp_path / "run")
    latest = _damage_latest(tmp_path / "run", how)
    run = load_model(tmp_path / "run", "latest")
    assert run.meta["step"] < latest
    assert "is damaged" in capsys.readouterr().out


def test_all_checkpoints_damaged_is_a_clear_error(tmp_path):
    train_and_evaluate(tiny_config(epochs=1, keep=1), tmp_path / "run")
    _damage_latest(tmp_path / "run", "delete")
    result = run_cli("evaluate", str(tmp_path / "run"), "--checkpoint", "latest")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("jax-mnist: error:")
    assert "every checkpoint is damaged" in result.stderr


def test_evaluate_missing_run_is_a_clear_error(tmp_path):
    result = run_cli("evaluate", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"jax-mnist: error: {tmp_path / 'nothing'}: no such run directory"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_epoch_saves_and_resume_loses_nothing(tmp_path, signum):
    flags = [
        "--train-size",
        "4096",
        "--val-size",
        "512",
        "--batch-size",
        "64",
        "--epochs",
        "2",
        "--log-every",
        "4",
        "--eval-batch-size",
        "512",
    ]
    straight = run_cli("train", *flags, "--workdir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    workdir = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jax_mnist", "train", *flags, "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        seen = 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # a few log lines in: the middle of epoch 1
            line = proc.stdout.readline()
            if line.startswith("Epoch 1, Loss"):
                seen += 1
                if seen == 3:
                    break
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert "saved a checkpoint" in err and "--resume" in err and "Traceback" not in err
    saved = Checkpoints(workdir).steps()
    assert saved and 0 < max(saved) < 64  # mid-epoch 1 (64 steps per epoch)

    resumed = run_cli("train", "--workdir", str(workdir), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from step {max(saved)}" in resumed.stdout
    assert records(workdir) == records(tmp_path / "straight")
    assert_same_tree(latest_state(workdir), latest_state(tmp_path / "straight"))
