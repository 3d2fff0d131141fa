"""The backend's quirks: the convolution with canonical-layout gradients and where it goes,
the scan-or-unroll choice, the compiler options, and each private JAX name with its fallback."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jax_mnist import backend, runtime
from jax_mnist.models import build_model, smallcnn

NHWC = ("NHWC", "HWIO", "NHWC")
YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


@pytest.mark.parametrize(
    ("cin", "cout", "size", "padding"),
    [(1, 32, 28, "SAME"), (32, 64, 14, "SAME"), (3, 5, 9, "VALID"), (4, 6, 8, ((2, 1), (0, 2)))],
)
def test_conv_matches_lax_values_and_gradients(cin, cout, size, padding):
    rng = np.random.default_rng(0)  # numpy's: inputs, not what is checked
    x = jnp.asarray(rng.normal(size=(3, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, (1, 1), padding, dimension_numbers=NHWC)))

    want = jax.jit(jax.value_and_grad(functools.partial(loss, lax.conv_general_dilated), (0, 1)))(x, w)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, backend.conv_general_dilated), (0, 1)))(x, w)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(a))))


def test_conv_leaves_other_convolutions_to_lax():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    jaxpr = jax.make_jaxpr(
        lambda x, w: backend.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=NHWC)
    )(x, w)
    assert "custom_vjp" not in str(jaxpr)


def _convs(model: nnx.Module) -> list[nnx.Conv]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]


def test_use_fast_conv_gradients_reaches_every_conv_and_keeps_the_parameters():
    def make():
        return smallcnn.SmallCNN(
            num_classes=10, dropout=0.0, width=0, depth=3, dtype=jnp.float32, rngs=nnx.Rngs(params=0)
        )

    plain, fast = make(), backend.use_fast_conv_gradients(make())
    assert [c.conv_general_dilated for c in _convs(plain)] == [lax.conv_general_dilated] * 3
    assert [c.conv_general_dilated for c in _convs(fast)] == [backend.conv_general_dilated] * 3
    a, b = nnx.state(plain), nnx.state(fast)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 1)), jnp.float32)
    np.testing.assert_array_equal(plain(x), fast(x))  # the forward pass is lax's own convolution


def test_use_fast_conv_gradients_keeps_a_layers_own_convolution():
    def own(*args, **kwargs):
        return lax.conv_general_dilated(*args, **kwargs)

    conv = nnx.Conv(1, 2, (3, 3), conv_general_dilated=own, rngs=nnx.Rngs(0))
    assert backend.use_fast_conv_gradients(conv).conv_general_dilated is own


@pytest.mark.parametrize(("name", "fast"), [("cnn", True), ("smallcnn_bn", True), ("lenet5", False)])
def test_built_models_take_the_backends_gradients_where_their_entry_asks(name, fast):
    model = nnx.eval_shape(functools.partial(build_model, name))
    want = backend.conv_general_dilated if fast else lax.conv_general_dilated
    assert _convs(model) and all(c.conv_general_dilated is want for c in _convs(model))


def _conv_step(conv):
    """A scan body whose gradient goes through ``conv``."""

    def body(w, _):
        x = jnp.ones((2, 6, 6, 2))
        g = jax.grad(lambda w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC)))(w)
        return w - g, None

    return body


def test_scan_unroll_loops_canonical_gradients_and_unrolls_the_others():
    w = jnp.ones((3, 3, 2, 4))
    loop = backend.scan_unroll(_conv_step(backend.conv_general_dilated), w, 4)
    assert loop == 1 and loop is not True  # (True == 1 in Python)
    plain = backend.scan_unroll(_conv_step(lax.conv_general_dilated), w, 4)
    if jax.default_backend() == "cpu":
        assert plain is True
    else:
        assert plain == 1 and plain is not True

    def untraceable(carry, _):
        raise AssertionError("one step is not traced to be looked at")

    assert backend.scan_unroll(untraceable, w, 1) is True


def test_training_compiler_options_leave_a_users_xla_flags_alone(monkeypatch):
    backend.training_compiler_options.cache_clear()
    try:
        monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
        assert backend.training_compiler_options() == {}
        backend.training_compiler_options.cache_clear()
        monkeypatch.delenv("XLA_FLAGS")
        expected = YNN_OFF if jax.default_backend() == "cpu" else {}
        # An XLA that dropped the option would make this fail: time to look at the fast path again.
        assert backend.training_compiler_options() == expected
    finally:
        backend.training_compiler_options.cache_clear()


# --- Private JAX names: the real path, and the fallback when the name is gone ---------------


def test_a_missing_private_name_reads_as_none():
    assert backend._private("jax._src.no_such_module", "anything") is None
    assert backend._private("jax._src.lib", "no_such_name") is None
    assert backend._private("jax._src.lib", "_jax") is not None  # the real path on this JAX


def test_backends_initialized_asks_jax_and_falls_back_to_false(monkeypatch):
    import jax._src.xla_bridge as xla_bridge

    jax.devices()  # started, whatever ran before
    assert backend.backends_initialized() is True
    assert runtime.backend_started() is True
    monkeypatch.delattr(xla_bridge, "backends_are_initialized")
    assert backend.backends_initialized() is False
    assert runtime.backend_started() is False


def test_xla_debug_options_are_read_and_a_compile_is_the_fallback(monkeypatch):
    import jax._src.lib as jax_lib

    option = "xla_cpu_experimental_ynn_fusion_type"
    backend.training_compiler_options.cache_clear()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    try:
        # The real path: this XLA's default debug options name the option (on the CPU build).
        if jax.default_backend() == "cpu":
            assert backend._default_debug_options_name(option) is True
        assert backend._default_debug_options_name("no_such_option_anywhere") is False
        expected = YNN_OFF if jax.default_backend() == "cpu" else {}
        # Without jaxlib's private _jax, XLA is asked by compiling a trivial program instead.
        monkeypatch.delattr(jax_lib, "_jax")
        assert backend._default_debug_options_name(option) is False
        assert backend.training_compiler_options() == expected
    finally:
        backend.training_compiler_options.cache_clear()
