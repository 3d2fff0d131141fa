"""Files written by jax-mnist 0.2.0 still load: a run directory and two settings files.

``tests/fixtures/mlp-run`` was trained by 0.2.0 with ``jax-mnist train --model mlp --width 8
--depth 1 --epochs 1 --train-size 256 --val-size 128 --batch-size 64 --eval-batch-size 128
--log-every 2 --progress plain --no-tensorboard`` (its ``test_predictions.npz`` left out to keep
it small). Nothing in this folder is rewritten: a change that breaks these tests breaks the runs
and settings files people already have.
"""

import json
import shutil
from pathlib import Path

import pytest

from jax_mnist.checkpoint import Checkpoints
from jax_mnist.config import Config, load_config_file, resolve_config
from jax_mnist.errors import UserError
from jax_mnist.evaluate import evaluate_runs
from jax_mnist.inference import load_model
from jax_mnist.resume import resolve_run
from jax_mnist.runs import load_run
from jax_mnist.train import train_and_evaluate

FIXTURES = Path(__file__).parent / "fixtures"
RUN = FIXTURES / "mlp-run"

STORED = Config(
    model="mlp",
    width=8,
    depth=1,
    epochs=1.0,
    train_size=256,
    val_size=128,
    batch_size=64,
    eval_batch_size=128,
    log_every=2,
    progress="plain",
    tensorboard=False,
)


@pytest.fixture
def run_copy(tmp_path):
    return Path(shutil.copytree(RUN, tmp_path / "run"))


def test_stored_run_config_reads_back():
    run = load_run(RUN)
    assert run.config == STORED
    assert [r["epoch"] for r in run.epochs] == [1]
    assert run.test is not None


def test_stored_run_evaluates_as_when_it_was_trained():
    result = evaluate_runs([RUN], warn=lambda *_: None)
    (member,) = result["members"]
    assert member["step"] == 4 and member["model"] == "mlp"
    assert member["accuracy"] == pytest.approx(load_run(RUN).test["test_accuracy"], abs=2e-3)


def test_stored_run_resumes_with_its_config_and_allowed_changes(run_copy):
    assert resolve_run(run_copy, {}, resume=True) == STORED
    # Settings of the schedule and of the machine may change; so may epochs (constant rate).
    changes = {
        "log_every": 1,
        "checkpoint_every": 2,
        "checkpoint_every_steps": 3,
        "keep": 1,
        "progress": "bar",
        "tensorboard": True,
        "devices": 1,
        "cache_dir": "elsewhere",
        "tfds_data_dir": "elsewhere",
        "deterministic": False,
        "compilation_cache": False,
        "epochs": 2.0,
    }
    assert resolve_run(run_copy, changes, resume=True) == STORED.replace(**changes)


def test_stored_run_trains_on_and_serves_beside_checkpoints_with_checksums(run_copy):
    # Its checkpoint (step 4) has no checksums in its meta; the ones training adds have.
    train_and_evaluate(STORED.replace(epochs=2.0), run_copy)
    with Checkpoints(run_copy, read_only=True) as checkpoints:
        assert checkpoints.steps() == [4, 8]
    old = json.loads((run_copy / "checkpoints" / "latest" / "4" / "meta" / "metadata").read_text())
    new = json.loads((run_copy / "checkpoints" / "latest" / "8" / "meta" / "metadata").read_text())
    assert "checksums" not in old and "params/hidden/0/kernel" in new["checksums"]
    assert load_model(run_copy, 4).meta["step"] == 4  # read unchecked, as before
    notes = []
    model = load_model(run_copy, warn=notes.append)  # what serve, evaluate and export load
    assert model.meta["step"] in (4, 8) and notes == [] and "checksums" not in model.meta


@pytest.mark.parametrize(
    "change", [{"lr": 0.01}, {"width": 16}, {"seed": 1}, {"data_dir": "elsewhere"}, {"eval_batch_size": 64}]
)
def test_stored_run_refuses_changes_to_what_it_computes(run_copy, change):
    with pytest.raises(UserError, match="holds a run with other settings"):
        resolve_run(run_copy, change, resume=True)


def test_stored_settings_files_read_back():
    toml = resolve_config({}, FIXTURES / "settings.toml").validate()
    assert toml == Config(
        preset="fast",
        width=16,
        epochs=4.0,
        val_size=0,
        model="lenet5",
        batch_size=64,
        lr=0.002,
        schedule="cosine",
        aug_shift=1.5,
        progress="plain",
        log_every=50,
        devices=1,
        tensorboard=False,
        compilation_cache=False,
    )
    json = resolve_config({"keep": 5}, FIXTURES / "settings.json").validate()
    assert json == Config(
        model="smallcnn_bn",
        width=16,
        depth=2,
        optimizer="sgd",
        momentum=0.95,
        nesterov=True,
        epochs=2.0,
        dtype="bfloat16",
        val_seed=7,
        keep=5,
        checkpoint_every_steps=100,
        deterministic=False,
    )
    # A run's own config.json is a settings file too.
    assert Config.from_dict(load_config_file(RUN / "config.json")) == STORED
