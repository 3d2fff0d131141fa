"""The fast path computes what the straightforward one does.

The seed CNN's convolutions get ``backend.conv_general_dilated`` (gradients in XLA:CPU's
canonical layout) and ``train_chunk`` loops its steps in a ``lax.scan``; these tests compare
both against a plain ``nnx.Conv`` model stepped by a Python loop, and check that the
compiled loop body holds no convolution that would fall off XLA:CPU's fast path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jax_mnist import backend, steps, train
from jax_mnist.config import Config
from jax_mnist.data import load_dataset
from jax_mnist.models import MODELS, cnn, create_model, initialize


def _plain_cnn(**kwargs):
    """The seed CNN as its class builds it, with nnx.Conv's own convolution: the
    straightforward version."""
    model = cnn.CNN(**kwargs)
    assert all(conv.conv_general_dilated is lax.conv_general_dilated for conv in (model.conv1, model.conv2))
    return model


def test_same_parameters_as_a_plain_model():
    fast = create_model("cnn", seed=3)
    plain = initialize(
        lambda: _plain_cnn(
            num_classes=10, dropout=0.5, width=0, depth=0, dtype=jnp.float32, rngs=nnx.Rngs(params=3)
        )
    )
    a, b = nnx.state(fast, nnx.Param), nnx.state(plain, nnx.Param)
    assert jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)
    assert fast.conv2.kernel[...].shape == (3, 3, 32, 64)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_fast_training_matches_the_straightforward_version(monkeypatch):
    # 8 steps: the product's scanned chunk with the backend's convolution, against a
    # plain-nnx.Conv model stepped one jitted call at a time. Same data order, dropout keys and
    # initialization.
    config = Config()
    arrays = load_dataset(config)
    images = jnp.asarray(arrays.train_images[:1024])
    labels = jnp.asarray(arrays.train_labels[:1024], jnp.int32)
    order = steps.epoch_order(jax.random.key_data(jax.random.key(1)), 0, 1024)

    setup = train.create_setup(config, steps_per_epoch=8)
    chunk = jax.jit(
        functools.partial(steps.train_chunk, settings=setup.settings, batch_size=128, steps_per_epoch=8),
        static_argnames="num_steps",
        compiler_options=backend.compiler_options("train"),
    )
    fast_state, fast_sums = chunk(train.create_train_state(setup), order, images, labels, num_steps=8)
    assert (
        "while" in chunk.lower(train.create_train_state(setup), order, images, labels, num_steps=8).as_text()
    )

    monkeypatch.setitem(MODELS, "cnn", dataclasses.replace(MODELS["cnn"], fast_conv_gradients=False))
    plain_setup = train.create_setup(config, steps_per_epoch=8)
    step = jax.jit(functools.partial(steps.train_step, settings=plain_setup.settings))
    state = train.create_train_state(plain_setup)
    losses = []
    for i in range(8):
        index = order[i * 128 : (i + 1) * 128]
        state, sums = step(state, images[index], labels[index])
        losses.append(float(sums["loss"]))
    np.testing.assert_allclose(float(fast_sums["loss"]), sum(losses), rtol=1e-4)
    for x, y in zip(jax.tree.leaves(fast_state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)


def test_seed_cnn_loop_body_has_only_canonical_convolutions():
    setup = train.create_setup(Config(), steps_per_epoch=10)
    state = jax.eval_shape(setup.initial_state)
    images = jax.ShapeDtypeStruct((128, 28, 28), jnp.uint8)
    labels = jax.ShapeDtypeStruct((128,), jnp.int32)
    jaxpr = jax.make_jaxpr(functools.partial(steps.train_step, settings=setup.settings))(
        state, images, labels
    )
    assert backend.loops_well(jaxpr)
    if jax.default_backend() != "cpu":
        return
    # The plain model's kernel gradient is not canonical: it must not be looped.
    plain = jax.make_jaxpr(
        jax.grad(
            lambda w, x: jnp.sum(
                lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            )
        )
    )(jnp.ones((3, 3, 2, 4)), jnp.ones((2, 6, 6, 2)))
    assert not backend.loops_well(plain)


def test_bfloat16_trains_with_float32_master_weights():
    config = Config(dtype="bfloat16")
    setup = train.create_setup(config, steps_per_epoch=8)
    state = train.create_train_state(setup)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    arrays = load_dataset(config)
    images = jnp.asarray(arrays.train_images[:1024])
    labels = jnp.asarray(arrays.train_labels[:1024], jnp.int32)
    order = jnp.arange(1024, dtype=jnp.int32)
    chunk = jax.jit(
        functools.partial(steps.train_chunk, settings=setup.settings, batch_size=128, steps_per_epoch=8),
        static_argnames="num_steps",
    )
    losses = []
    for _ in range(3):
        state, sums = chunk(state, order, images, labels, num_steps=8)
        losses.append(float(sums["loss"] / sums["count"]))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses
