"""The inference runtime: a trained model restored without its optimizer."""

import jax
import numpy as np
import pytest
from helpers import tiny_config

from jax_mnist.checkpoint import Checkpoints
from jax_mnist.errors import UserError
from jax_mnist.inference import load_model
from jax_mnist.train import abstract_train_state, create_setup, train_and_evaluate


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("inference") / "run"
    train_and_evaluate(tiny_config(model="smallcnn_bn", epochs=2, ema_decay=0.9, lr=3e-3), workdir)
    return workdir


def test_restores_the_evaluation_weights_and_statistics_only(ema_run):
    model = load_model(ema_run, "latest")
    with Checkpoints(ema_run, read_only=True) as checkpoints:
        full, _ = checkpoints.restore(abstract_train_state(create_setup(model.config, 1)))
    assert set(model.variables) == {"params", "model_state"}
    for got, want in (
        (model.variables["params"], full.ema_params),
        (model.variables["model_state"], full.ema_model_state),
    ):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert model.meta["step"] == 32 and model.num_params == sum(x.size for x in jax.tree.leaves(full.params))


def test_predictions_match_the_runs_own_test_evaluation(ema_run):
    model = load_model(ema_run, "latest")
    saved = np.load(ema_run / "test_predictions.npz")
    from jax_mnist.data import load_dataset

    images = load_dataset(model.config).test_images
    logits = model.predict_logits(images)
    assert logits.shape == (10_000, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, saved["logits"], rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == saved["logits"].argmax(1)).mean() > 0.999
    # One image alone, and [0, 1] floats instead of uint8, give the same answer.
    np.testing.assert_allclose(model.predict_logits(images[:1]), logits[:1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        model.predict_logits(images[:5].astype(np.float32) / 255), logits[:5], rtol=1e-4, atol=1e-4
    )


def test_describe_and_bad_shapes(ema_run):
    model = load_model(ema_run)
    facts = model.describe()
    assert facts["model"] == "smallcnn_bn" and facts["classes"] == [str(d) for d in range(10)]
    assert facts["parameters"] == model.num_params and facts["test_accuracy"] is not None
    assert facts["run"] == str(ema_run)
    with pytest.raises(UserError, match=r"expected images of shape \[N, 28, 28\], got \[2, 28\]"):
        model.predict_logits(np.zeros((2, 28)))
    assert model.predict_logits(np.zeros((0, 28, 28), np.uint8)).shape == (0, 10)


def test_missing_run_and_run_without_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoints here"):
        load_model(tmp_path / "empty")
