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


def test_evaluation_sums_the_training_loss_over_the_real_images_only(ema_run):
    from jax_mnist.data import load_dataset
    from jax_mnist.runs import read_metrics

    model = load_model(ema_run, "latest")
    images, labels = load_dataset(model.config).test_split()
    logits = model.predict_logits(images)
    x = logits.astype(np.float64) - logits.max(1, keepdims=True)
    reference = (np.log(np.exp(x).sum(1)) - x[np.arange(len(labels)), labels]).mean()
    # 300 images in batches of 128: the last padded to 64 rows, 20 of them padding.
    for n, batch_size in ((10_000, None), (300, 128), (1, 8)):
        got_logits, metrics = model.evaluate(images[:n], labels[:n], batch_size=batch_size)
        np.testing.assert_array_equal(got_logits, model.predict_logits(images[:n], batch_size=batch_size))
        x = got_logits.astype(np.float64) - got_logits.max(1, keepdims=True)
        want = (np.log(np.exp(x).sum(1)) - x[np.arange(n), labels[:n]]).mean()
        # float32 against float64: an example's loss is off by up to its logits' size times
        # float32's epsilon, which is more than 1e-5 of the tiny loss of one confident image.
        assert metrics["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert metrics["accuracy"] == (got_logits.argmax(1) == labels[:n]).mean()
    # The run's own test record: the same quantity (its batches were cut otherwise).
    (test,) = [r for r in read_metrics(ema_run / "metrics.jsonl") if r.get("kind") == "test"]
    assert test["test_loss"] == pytest.approx(reference, rel=1e-4)
    # Test-time augmentation: the loss and accuracy of the averaged prediction.
    tta_logits, tta = model.evaluate(images[:300], labels[:300], tta=True)
    x = tta_logits.astype(np.float64) - tta_logits.max(1, keepdims=True)
    want = (np.log(np.exp(x).sum(1)) - x[np.arange(300), labels[:300]]).mean()
    assert tta["loss"] == pytest.approx(want, rel=1e-5)
    assert tta["accuracy"] == (tta_logits.argmax(1) == labels[:300]).mean()
