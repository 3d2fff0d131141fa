"""Schedules, weight-decay mask and clipping of the optimizer a config asks for."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_mnist.config import Config
from jax_mnist.optim import create_optimizer, create_schedule

SPE = 10  # steps per epoch


def lr_at(config, steps):
    schedule = create_schedule(config, SPE)
    return np.array([float(schedule(s)) for s in steps])


def test_constant_schedule_with_warmup():
    config = Config(lr=1e-2, warmup_epochs=1.0, epochs=3)
    np.testing.assert_allclose(lr_at(config, [0, 5, 10, 29, 500]), [0.0, 5e-3, 1e-2, 1e-2, 1e-2], rtol=1e-6)


def test_cosine_warms_up_peaks_and_ends_at_zero():
    config = Config(lr=1e-2, schedule="cosine", warmup_epochs=1.0, epochs=3)
    values = lr_at(config, [0, 5, 10, 20, 30])
    np.testing.assert_allclose(values[:3], [0.0, 5e-3, 1e-2], rtol=1e-6)
    np.testing.assert_allclose(values[3], 5e-3, rtol=1e-6)  # halfway through the decay
    assert values[4] == pytest.approx(0.0, abs=1e-9)


def test_onecycle_peaks_at_the_lr_and_ends_near_zero():
    config = Config(lr=3e-3, schedule="onecycle", epochs=4)
    total = 4 * SPE
    values = lr_at(config, range(total + 1))
    assert values.max() == pytest.approx(3e-3, rel=1e-6)
    assert int(values.argmax()) == int(0.3 * total)  # optax's default: 30% of the run warms up
    assert values[0] == pytest.approx(3e-3 / 25, rel=1e-5)
    assert values[-1] < 1e-6


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    config = Config(lr=1.0, schedule="step", epochs=4)
    np.testing.assert_allclose(
        lr_at(config, [0, 19, 20, 29, 30, 39]), [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6
    )


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step"])
def test_schedules_over_the_run_depend_on_its_length(schedule):
    # Why --epochs is fixed when a run with these schedules resumes (see resume.check_resume_config).
    short, long = Config(schedule=schedule, epochs=2), Config(schedule=schedule, epochs=4)
    assert short.schedule_spans_run
    assert not np.allclose(lr_at(short, range(20)), lr_at(long, range(20)))


def test_constant_schedule_does_not_depend_on_the_run_length():
    short, long = Config(epochs=2, warmup_epochs=0.5), Config(epochs=4, warmup_epochs=0.5)
    assert not short.schedule_spans_run
    np.testing.assert_array_equal(lr_at(short, range(20)), lr_at(long, range(20)))


PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}, "bn": {"scale": jnp.ones((2,))}}
ZERO_GRADS = jax.tree.map(jnp.zeros_like, PARAMS)


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "sgd", "adam", "rmsprop"])
def test_weight_decay_applies_to_kernels_only(optimizer):
    tx = create_optimizer(Config(optimizer=optimizer, lr=0.1, weight_decay=0.5, momentum=0.0), SPE)
    updates, _ = tx.update(ZERO_GRADS, tx.init(PARAMS), PARAMS)
    assert float(jnp.abs(updates["dense"]["kernel"]).min()) > 0  # decayed toward zero
    assert float(updates["dense"]["kernel"].max()) < 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["bn"]["scale"]).max()) == 0.0


def test_gradient_clipping_bounds_the_global_norm():
    grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), PARAMS)
    clipped = create_optimizer(Config(optimizer="sgd", lr=1.0, momentum=0.0, grad_clip=1.0), SPE)
    plain = create_optimizer(Config(optimizer="sgd", lr=1.0, momentum=0.0), SPE)
    updates, _ = clipped.update(grads, clipped.init(PARAMS), PARAMS)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
    updates, _ = plain.update(grads, plain.init(PARAMS), PARAMS)
    assert float(optax.tree.norm(updates)) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)


def test_every_optimizer_choice_has_an_entry_reading_config_fields():
    from jax_mnist.config import FIELDS, SEARCHABLE_FIELDS
    from jax_mnist.optim import OPTIMIZERS

    assert set(OPTIMIZERS) == set(FIELDS["optimizer"].metadata["choices"])
    for entry in OPTIMIZERS.values():
        assert set(entry.reads) <= set(FIELDS)
    assert {"b1", "b2"} <= SEARCHABLE_FIELDS


@pytest.mark.parametrize(("optimizer", "kwargs"), [("adam", {}), ("adamw", {"weight_decay": 0.0})])
def test_adam_betas_default_to_optax_and_change_the_updates(optimizer, kwargs):
    grads = [jax.tree.map(lambda p, k=k: (k + 1.0) * jnp.ones_like(p) * (-1) ** k, PARAMS) for k in range(3)]

    def updates(tx):
        state, out = tx.init(PARAMS), []
        for g in grads:
            u, state = tx.update(g, state, PARAMS)
            out.append(u)
        return out

    default = getattr(optax, optimizer)(1e-2, **kwargs)
    ours = create_optimizer(Config(optimizer=optimizer, lr=1e-2), SPE)
    for a, b in zip(jax.tree.leaves(updates(default)), jax.tree.leaves(updates(ours)), strict=True):
        np.testing.assert_array_equal(a, b)  # the same bits as before the betas were settings
    betas = create_optimizer(Config(optimizer=optimizer, lr=1e-2, b1=0.7, b2=0.9), SPE)
    wanted = getattr(optax, optimizer)(1e-2, b1=0.7, b2=0.9, **kwargs)
    for a, b, c in zip(
        jax.tree.leaves(updates(wanted)),
        jax.tree.leaves(updates(betas)),
        jax.tree.leaves(updates(default)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(b, c)
