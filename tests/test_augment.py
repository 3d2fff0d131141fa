import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist.augment import AugmentSettings, augment
from jax_mnist.config import Config
from jax_mnist.data import load_dataset


def images():
    return jnp.asarray(load_dataset(Config()).test_images[:16], jnp.float32) / 255.0


def test_zero_strengths_are_the_identity():
    x = images()
    np.testing.assert_array_equal(augment(jax.random.key(0), x, AugmentSettings()), x)


def test_tiny_strengths_are_nearly_the_identity():
    x = images()
    y = augment(jax.random.key(0), x, AugmentSettings(shift=1e-4, rotate=1e-4, scale=1e-5))
    np.testing.assert_allclose(y, x, atol=1e-3)


def test_augmentation_keeps_shapes_range_and_ink_and_is_reproducible():
    x = images()
    settings = AugmentSettings(shift=2.0, rotate=10.0, scale=0.1, elastic=1.0)
    y = augment(jax.random.key(1), x, settings)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 + 1e-6
    assert not np.allclose(y, x)
    # Ink is moved, not created or lost (to within resampling and edge effects).
    np.testing.assert_allclose(y.sum(axis=(1, 2)), x.sum(axis=(1, 2)), rtol=0.25)
    np.testing.assert_array_equal(y, augment(jax.random.key(1), x, settings))
    assert not np.allclose(y, augment(jax.random.key(2), x, settings))
