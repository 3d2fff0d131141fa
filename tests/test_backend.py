"""The backend's quirks: the convolution with canonical-layout gradients and where it goes,
the scan-or-unroll choice, the compiler options, and each private JAX name with its fallback."""

from __future__ import annotations

import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from jax_mnist import backend
from jax_mnist.models import MODELS, build_model, smallcnn

NHWC = ("NHWC", "HWIO", "NHWC")
YNN = "xla_cpu_experimental_ynn_fusion_type"
TRAIN = {YNN: "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


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


def _scan_unroll(jaxpr) -> int | bool:
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    return scan.params["unroll"]


def test_scan_steps_loops_canonical_gradients_traced_once_and_unrolls_the_others():
    w = jnp.ones((3, 3, 2, 4))
    traced = []

    def counted(carry, x):
        traced.append(1)
        return _conv_step(backend.conv_general_dilated)(carry, x)

    loop = jax.make_jaxpr(lambda w: backend.scan_steps(counted, w, 4))(w)
    assert _scan_unroll(loop) == 1
    assert len(traced) == 1  # the scan looked at is the one emitted
    plain = jax.make_jaxpr(lambda w: backend.scan_steps(_conv_step(lax.conv_general_dilated), w, 4))(w)
    assert _scan_unroll(plain) == (4 if jax.default_backend() == "cpu" else 1)  # all 4 steps unrolled
    # the same steps either way
    looped = backend.scan_steps(_conv_step(backend.conv_general_dilated), w, 4)
    unrolled = backend.scan_steps(_conv_step(lax.conv_general_dilated), w, 4)
    np.testing.assert_allclose(looped, unrolled, rtol=1e-6)


@pytest.fixture
def fresh_options(monkeypatch):
    """compiler_options computed afresh, without the user's XLA_FLAGS, and forgotten after."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    backend._cpu_options.cache_clear()
    yield
    backend._cpu_options.cache_clear()


def test_each_program_gets_its_options_and_a_users_xla_flags_win(fresh_options, monkeypatch):
    cpu = jax.default_backend() == "cpu"
    # An XLA that dropped an option or a value would make this fail: time to measure again.
    assert backend.compiler_options("train") == (TRAIN if cpu else None)
    assert backend.compiler_options("init") == ({"xla_backend_optimization_level": 1} if cpu else None)
    assert backend.compiler_options("eval") is None  # XLA's defaults
    assert backend.compiler_flags("train") == (
        ["--xla_cpu_experimental_ynn_fusion_type=reduce,individual_dot"] if cpu else []
    )
    # a model's own choice for its training chunk replaces the fusion types, and only them
    fused = ("reduce", "individual_dot", "eltwise")
    assert backend.compiler_options("train", fused) == (
        {YNN: backend.ynn_fusion_type(fused)} if cpu else None
    )
    assert backend.compiler_flags("train", fused) == (
        [f"--{YNN}=reduce,individual_dot,eltwise"] if cpu else []
    )
    # every model's own training fusions are types this XLA takes (read from its debug
    # options, or asked by compiling a trivial program)
    for name, entry in MODELS.items():
        if entry.cpu_training_fusions is not None:
            assert set(entry.cpu_training_fusions) <= set(backend.YNN_FUSION_TYPES), name
            spelled = backend.ynn_fusion_type(entry.cpu_training_fusions)
            assert backend.compiler_options("train", entry.cpu_training_fusions) == (
                {YNN: spelled} if cpu else None
            ), name
    with pytest.raises(ValueError, match="unknown program 'training'"):
        backend.compiler_options("training")
    backend._cpu_options.cache_clear()
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN}=individual_dot")
    assert backend.compiler_options("train") is None
    assert backend.compiler_options("train", fused) is None
    assert backend.compiler_flags("train") == []


def test_the_options_spelled_for_jit_are_taken_and_change_the_program(fresh_options):
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's options")

    def f(x):  # a reduction, then a dot
        return (x - x.mean(0)) @ x.T

    def compiled(options):
        return (
            jax.jit(f, compiler_options=options).lower(jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile()
        )

    with pytest.raises(Exception, match="not a valid enum value"):  # XLA_FLAGS' spelling
        compiled({YNN: "reduce"})
    assert '"__ynn_fusion"' not in compiled({YNN: ""}).as_text()
    assert '"__ynn_fusion"' in compiled(backend.compiler_options("train")).as_text()
    assert backend.ynn_fusion_type(()) == ""


# --- Private JAX names: the real path, and the fallback when the name is gone ---------------


def test_a_missing_private_name_reads_as_none():
    assert backend._private("jax._src.no_such_module", "anything") is None
    assert backend._private("jax._src.lib", "no_such_name") is None
    assert backend._private("jax._src.lib", "_jax") is not None  # the real path on this JAX


def test_backend_started_asks_jax_and_falls_back_to_false(monkeypatch):
    import jax._src.xla_bridge as xla_bridge

    jax.devices()  # started, whatever ran before
    assert backend.backend_started() is True
    monkeypatch.delattr(xla_bridge, "backends_are_initialized")
    assert backend.backend_started() is False


def test_xla_debug_options_are_read_and_a_compile_is_the_fallback(fresh_options, monkeypatch):
    import jax._src.lib as jax_lib

    value = TRAIN[YNN]
    # The real path: this XLA's default debug options name the option and both values.
    if jax.default_backend() == "cpu":
        assert f"{YNN}:" in backend._default_debug_options()
        assert backend._xla_knows(YNN, value)
    assert not backend._xla_knows("no_such_option_anywhere", 1)
    assert not backend._xla_knows(YNN, "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE")
    expected = backend.compiler_options("train")
    backend._cpu_options.cache_clear()
    # Without jaxlib's private _jax, XLA is asked by compiling a trivial program instead.
    # (JAX's own garbage-collection callback reads _jax too: the collector stays off while
    # the name is gone, or a collection there would report a NameError of this test's making.)
    gc.disable()
    try:
        with monkeypatch.context() as patched:
            patched.delattr(jax_lib, "_jax")
            assert backend._default_debug_options() == ""
            assert backend.compiler_options("train") == expected
    finally:
        gc.enable()
