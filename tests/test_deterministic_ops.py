"""The training step holds no op that deterministic GPU kernels slow down.

With ``--xla_gpu_deterministic_ops`` (our default) XLA serializes scatters and
select-and-scatter (the usual gradient of max pooling) and sorts where it would add
atomically. The lowered StableHLO is the same on every backend, so the check runs on the CPU.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_mnist import config as config_module
from jax_mnist import train
from jax_mnist.config import Config
from jax_mnist.models import MODELS
from jax_mnist.models.pooling import max_pool

# Ops XLA makes deterministic on a GPU by serializing or sorting.
SLOW_WHEN_DETERMINISTIC = ("scatter", "select_and_scatter", "sort")


def lowered_train_chunk(config: Config, num_steps: int = 2) -> str:
    """The StableHLO text of the jitted training chunk ``config`` trains with."""
    steps_per_epoch = 4
    setup = train.create_setup(config, steps_per_epoch)
    chunk = train.make_train_chunk_fn(setup, config.batch_size, steps_per_epoch)
    n = config.batch_size * steps_per_epoch
    return chunk.lower(
        train.abstract_train_state(setup),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n, 28, 28), jnp.uint8),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        num_steps=num_steps,
    ).as_text()


def slow_ops(text: str) -> list[str]:
    pattern = r"stablehlo\.(" + "|".join(SLOW_WHEN_DETERMINISTIC) + r")\b"
    return sorted(set(re.findall(pattern, text)))


def test_the_check_finds_the_ops_it_looks_for():
    # The check can fail: plain max pooling and integer-label cross-entropy hold them.
    def loss(x, labels):
        import optax

        pooled = nnx.max_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)[:, :10]
        return optax.softmax_cross_entropy_with_integer_labels(pooled, labels).mean()

    x = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32)
    labels = jax.ShapeDtypeStruct((4,), jnp.int32)
    text = jax.jit(jax.grad(loss)).lower(x, labels).as_text()
    assert slow_ops(text) == ["scatter", "select_and_scatter"]


@pytest.mark.parametrize("preset", sorted(config_module.PRESETS))
def test_no_preset_trains_with_an_op_that_determinism_slows(preset):
    config = config_module.preset_config(preset)
    assert slow_ops(lowered_train_chunk(config)) == []


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_no_model_trains_with_an_op_that_determinism_slows(model, label_smoothing):
    config = Config(model=model, batch_size=16, label_smoothing=label_smoothing)
    assert slow_ops(lowered_train_chunk(config, num_steps=1)) == []


@pytest.mark.parametrize("shape", [(3, 8, 8, 2), (2, 7, 9, 3)])
def test_max_pool_matches_flax_bit_for_bit_ties_included(shape):
    # Values rounded to halves and put through ReLU: many windows hold equal maxima, and the
    # gradient must go to the same (first) one as select_and_scatter_add sends it to.
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(np.round(2 * rng.normal(size=shape)) / 2, 0), jnp.float32)
    g = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)  # compiled, as training runs them
    def value_and_vjp(pool, x, g):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(g)[0]

    got = value_and_vjp(max_pool, x, g)
    reference = value_and_vjp(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2)), x, g)
    np.testing.assert_array_equal(got[0], reference[0])
    np.testing.assert_array_equal(got[1], reference[1])
