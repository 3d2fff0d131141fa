import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist.models import MODELS, count_params, create_model


def test_seed_cnn_shape_and_parameter_count():
    model = create_model("cnn", dropout=0.5)
    logits = model(jnp.zeros((3, 28, 28, 1)), train=False)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    # conv 3*3*1*32+32, conv 3*3*32*64+64, dense 3136*256+256, dense 256*10+10
    assert count_params(model) == 320 + 18_496 + 803_072 + 2_570


def test_dropout_only_in_training():
    model = create_model("cnn", dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    np.testing.assert_array_equal(model(x), model(x))
    a = model(x, train=True, dropout_key=jax.random.key(1))
    b = model(x, train=True, dropout_key=jax.random.key(2))
    assert not np.allclose(a, b)


def test_registry_names():
    assert "cnn" in MODELS
