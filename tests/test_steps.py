import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mnist import steps, train
from jax_mnist.config import Config
from jax_mnist.data import load_dataset


def test_train_steps_lower_the_loss_on_a_fixed_batch():
    setup = train.create_setup(Config(), steps_per_epoch=10)
    state = train.create_train_state(setup)
    arrays = load_dataset(Config())
    images, labels = jnp.asarray(arrays.train_images[:128]), jnp.asarray(arrays.train_labels[:128], jnp.int32)
    step = jax.jit(functools.partial(steps.train_step, settings=setup.settings))
    losses = []
    for _ in range(5):
        state, sums = step(state, images, labels)
        losses.append(float(sums["loss"] / sums["count"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert int(state.step) == 5


def test_chunk_of_steps_equals_single_steps():
    # The unrolled chunk and five separate calls run the same steps in the same order.
    setup = train.create_setup(Config(), steps_per_epoch=8)
    arrays = load_dataset(Config())
    images = jnp.asarray(arrays.train_images[:1024])
    labels = jnp.asarray(arrays.train_labels[:1024], jnp.int32)
    order = steps.epoch_order(jax.random.key_data(jax.random.key(3)), 0, 1024)
    chunk = jax.jit(
        functools.partial(steps.train_chunk, settings=setup.settings, batch_size=128, steps_per_epoch=8),
        static_argnames="num_steps",
    )
    a, sums_a = chunk(train.create_train_state(setup), order, images, labels, num_steps=5)
    b = train.create_train_state(setup)
    total = 0.0
    for _ in range(5):
        b, s = chunk(b, order, images, labels, num_steps=1)
        total += float(s["loss"])
    assert int(a.step) == int(b.step) == 5
    np.testing.assert_allclose(float(sums_a["loss"]), total, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_epoch_order_is_a_permutation_that_changes_with_the_epoch():
    key = jax.random.key_data(jax.random.key(0))
    a, b = np.asarray(steps.epoch_order(key, 0, 100)), np.asarray(steps.epoch_order(key, 1, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, steps.epoch_order(key, 0, 100))


def test_logged_training_loss_is_the_plain_cross_entropy_under_label_smoothing():
    # The quantity validation and test report, so that the curves share an axis.
    config = Config(dropout=0.0, label_smoothing=0.2)
    setup = train.create_setup(config, steps_per_epoch=10)
    state = train.create_train_state(setup)
    arrays = load_dataset(config)
    images, labels = jnp.asarray(arrays.train_images[:64]), jnp.asarray(arrays.train_labels[:64], jnp.int32)
    logits = steps.apply_variables(
        {"params": state.params, "model_state": state.model_state}, images, setup.settings
    )
    plain = steps.cross_entropy(logits, labels, 10).sum()
    smoothed = steps.cross_entropy(logits, labels, 10, 0.2).sum()
    _, sums = jax.jit(functools.partial(steps.train_step, settings=setup.settings))(state, images, labels)
    np.testing.assert_allclose(float(sums["loss"]), float(plain), rtol=1e-5)
    assert not np.isclose(float(smoothed), float(plain), rtol=1e-4)  # what was logged before


def test_weight_ema_averages_the_batch_statistics_too():
    config = Config(model="smallcnn_bn", ema_decay=0.9)  # a model with batch statistics
    setup = train.create_setup(config, steps_per_epoch=10)
    state = train.create_train_state(setup)
    arrays = load_dataset(config)
    images, labels = jnp.asarray(arrays.train_images[:64]), jnp.asarray(arrays.train_labels[:64], jnp.int32)
    step = jax.jit(functools.partial(steps.train_step, settings=setup.settings))
    initial = state.model_state
    for _ in range(3):
        before = state
        state, _ = step(state, images, labels)
    decay = float(steps.ema_decay_at(2, 0.9))
    for ema, prev, live in zip(
        jax.tree.leaves(state.ema_model_state),
        jax.tree.leaves(before.ema_model_state),
        jax.tree.leaves(state.model_state),
        strict=True,
    ):
        np.testing.assert_allclose(ema, decay * prev + (1 - decay) * live, rtol=1e-5, atol=1e-6)
    # The averages move away from the initial statistics, and differ from the live ones.
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(state.ema_model_state), jax.tree.leaves(initial), strict=True)
    )
    assert any(
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree.leaves(state.ema_model_state), jax.tree.leaves(state.model_state), strict=True
        )
    )
    # Evaluation takes the averaged weights with the averaged statistics.
    variables = steps.eval_variables(state, setup.config.ema_decay)
    assert variables["params"] is state.ema_params and variables["model_state"] is state.ema_model_state


def _numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy in float64, by hand: the reference the device's is held to."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return np.log(np.exp(x).sum(-1)) - x[np.arange(len(labels)), labels]


def test_eval_step_sums_the_training_loss_and_leaves_the_padding_out():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (16, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    # Rows 11 to 15 are padding: huge losses and other labels that must not count.
    logits[11:], labels[11:] = 1e4 * np.eye(10, dtype=np.float32)[:5], 9
    step = jax.jit(functools.partial(steps.eval_step, lambda _, x: x, num_classes=10))
    out, sums = step(None, logits, labels, np.int32(11), steps.zero_sums())
    np.testing.assert_array_equal(out, logits)
    want = _numpy_cross_entropy(logits[:11], labels[:11]).sum()
    assert float(sums["loss"]) == pytest.approx(want, rel=1e-6)
    assert int(sums["correct"]) == int((logits[:11].argmax(1) == labels[:11]).sum())
    assert int(sums["count"]) == 11 and sums["count"].dtype == jnp.int32
    # The same loss as the training step's, and the sums carry over from batch to batch.
    np.testing.assert_allclose(
        float(sums["loss"]), float(steps.cross_entropy(logits[:11], labels[:11], 10).sum()), rtol=1e-6
    )
    _, twice = step(None, logits, labels, np.int32(11), sums)
    assert int(twice["count"]) == 22 and float(twice["loss"]) == pytest.approx(2 * want, rel=1e-6)
    means = steps.mean_metrics(jax.device_get(sums))
    assert means["loss"] == pytest.approx(want / 11, rel=1e-6)
    assert means["accuracy"] == int(sums["correct"]) / 11
