"""One property table over every registered model (optax-style), plus model-specific facts."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from jax_mnist import steps, train
from jax_mnist.checkpoint import Checkpoints
from jax_mnist.config import Config
from jax_mnist.data import load_dataset
from jax_mnist.models import (
    MODELS,
    abstract_model,
    build_model,
    count_params,
    create_model,
    model_from_config,
)

ALL_MODELS = sorted(MODELS)


@pytest.fixture(scope="module")
def batch():
    arrays = load_dataset(Config())
    return jnp.asarray(arrays.train_images[:64]), jnp.asarray(arrays.train_labels[:64], jnp.int32)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape_and_dtype(name):
    model = create_model(name, num_classes=10, dropout=0.5)
    logits = nnx.jit(lambda model, x: model(x, train=False))(model, jnp.zeros((3, 28, 28, 1)))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    other = nnx.eval_shape(lambda: build_model(name, num_classes=7)(jnp.zeros((2, 28, 28, 1))))
    assert other.shape == (2, 7)


# The full-size VGG and ResNet take most of the table's time; smallcnn_bn has batch norm too.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in ("resnet", "vgg") else n for n in ALL_MODELS]
)
def test_training_steps_lower_the_loss_and_evaluation_is_deterministic(name, batch, tmp_path):
    config = Config(model=name, dropout=0.1, lr=3e-3)
    setup = train.create_setup(config, steps_per_epoch=10)
    state = train.create_train_state(setup)
    step = jax.jit(functools.partial(steps.train_step, settings=setup.settings))
    losses = []
    for _ in range(6):
        state, sums = step(state, *batch)
        losses.append(float(sums["loss"] / sums["count"]))
    assert losses[-1] < 0.8 * losses[0], losses

    predict = train.make_predict_fn(setup)
    variables = {"params": state.params, "model_state": state.model_state}
    a = predict(variables, batch[0])
    np.testing.assert_array_equal(a, predict(variables, batch[0]))
    # Evaluation of one image does not depend on the rest of its batch (batch norm uses
    # its running statistics).
    np.testing.assert_allclose(predict(variables, batch[0][:1])[0], a[0], rtol=1e-4, atol=1e-4)

    # Parameters and batch statistics round-trip through a checkpoint exactly.
    with Checkpoints(tmp_path, keep=1) as checkpoints:
        checkpoints.save(state, {"step": 6, "epoch": 0.6}, config)
        restored, _ = checkpoints.restore(train.abstract_train_state(setup))
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "name",
    [
        "smallcnn_bn",
        pytest.param("vgg", marks=pytest.mark.slow),
        pytest.param("resnet", marks=pytest.mark.slow),
    ],
)
def test_batch_norm_statistics_move_in_training_only(name, batch):
    setup = train.create_setup(Config(model=name), steps_per_epoch=10)
    state = train.create_train_state(setup)
    before = jax.tree.leaves(state.model_state)
    assert before, "a batch-normalized model has batch statistics"
    state, _ = jax.jit(functools.partial(steps.train_step, settings=setup.settings))(state, *batch)
    assert any(not np.allclose(a, b) for a, b in zip(before, jax.tree.leaves(state.model_state), strict=True))


def test_seed_cnn_parameter_count():
    # conv 3*3*1*32+32, conv 3*3*32*64+64, dense 3136*256+256, dense 256*10+10
    assert count_params(create_model("cnn")) == 320 + 18_496 + 803_072 + 2_570


def test_dropout_only_in_training():
    model = create_model("cnn", dropout=0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 28, 28, 1)), jnp.float32)
    np.testing.assert_array_equal(model(x), model(x))
    a = model(x, train=True, dropout_key=jax.random.key(1))
    b = model(x, train=True, dropout_key=jax.random.key(2))
    assert not np.allclose(a, b)


@pytest.mark.parametrize("name", ["mlp", "vgg"])
def test_width_and_depth_knobs(name):
    # Shapes only (test_runtime.py checks that they count what a built model has).
    small = count_params(abstract_model(name, width=16, depth=1))
    assert count_params(abstract_model(name, width=32, depth=1)) > small
    assert count_params(abstract_model(name, width=16, depth=3)) > small


# Whole runs of a ResNet, evaluated on the 10,000 test images: slow. The fast subset trains
# batch-norm models in the step test above and in test_inference.py (smallcnn_bn with EMA).
@pytest.mark.slow
def test_a_batch_norm_model_trains_end_to_end_and_its_weight_ema_follows_the_weights_early(tmp_path):
    # Three short epochs: enough for the running statistics (momentum 0.9) to forget their
    # initial values, so evaluation with them is meaningful. Evaluation reads the EMA of the
    # weights and of those statistics: with a fixed decay of 0.999 the average after these 48
    # steps would still be 95% the random initial weights, and score at chance level.
    config = tiny_config(model="resnet", epochs=3, lr=3e-3, ema_decay=0.999)
    final = train.train_and_evaluate(config, tmp_path / "run")
    assert final["test_accuracy"] > 0.6


def test_ema_decay_ramps_up_to_its_setting():
    decays = steps.ema_decay_at(jnp.array([0, 10, 1000, 100_000]), 0.999)
    np.testing.assert_allclose(decays, [0.1, 11 / 20, 1001 / 1010, 0.999], rtol=1e-6)


def test_create_model_computes_the_parameters_build_model_computes_op_by_op():
    compiled, eager = create_model("smallcnn_bn", seed=3), build_model("smallcnn_bn", seed=3)
    assert jax.tree.structure(nnx.state(compiled)) == jax.tree.structure(nnx.state(eager))
    for a, b in zip(jax.tree.leaves(nnx.state(compiled)), jax.tree.leaves(nnx.state(eager)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# What serve/__init__.py said in 0.2.0, before the registry entries said it: measured by
# benchmarks/inference_engines.py, not something a test can derive.
ONNX_RUNTIME_FASTER_ON_CPU_OF_0_2_0 = {"lenet5", "vgg", "resnet"}


def test_registry_entries_say_what_serve_said_of_each_model_before():
    onnx = {name for name, entry in MODELS.items() if entry.cpu_engine == "onnx"}
    assert onnx == ONNX_RUNTIME_FASTER_ON_CPU_OF_0_2_0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_each_models_space_searches_the_sizes_its_model_reads(name):
    from jax_mnist.models import abstract_model, count_params

    space = MODELS[name].tune_space

    def sizes(field, values):
        return {count_params(abstract_model(name, **{field: v})) for v in values}

    assert set(space) <= {"width", "depth"}
    # every model reads its width: each choice is a model of its own size
    assert len(sizes("width", space["width"]["choices"])) == len(space["width"]["choices"])
    # depth is searched exactly where the model reads it
    assert ("depth" in space) == (len(sizes("depth", [1, 2])) == 2)
    if "depth" in space:
        depths = range(space["depth"]["low"], space["depth"]["high"] + 1)
        assert len(sizes("depth", depths)) == len(depths) > 1


@pytest.mark.parametrize("name", ALL_MODELS)
def test_registry_entry_tune_space_is_valid_and_engine_known(name):
    from jax_mnist.tune.space import default_space, parse_space

    entry = MODELS[name]
    assert entry.cpu_engine in ("jax", "onnx")
    params = parse_space(default_space(name), Config(model=name), source=name)
    assert set(entry.tune_space) <= {p.name for p in params}
    before = copy.deepcopy(entry.tune_space)
    default_space(name)["width"]["choices"].append(0)  # a copy: the registry stays as it is
    assert entry.tune_space == before


def test_compute_dtype_names_the_dtypes_a_config_may_choose():
    from jax_mnist.config import FIELDS
    from jax_mnist.models import COMPUTE_DTYPES, compute_dtype

    assert FIELDS["dtype"].metadata["choices"] == COMPUTE_DTYPES
    assert compute_dtype("float32") is jnp.float32 and compute_dtype("bfloat16") is jnp.bfloat16
    with pytest.raises(ValueError, match="compute dtype"):
        compute_dtype("float16")
    settings = Config(model="lenet5", dtype="bfloat16")
    model = nnx.eval_shape(model_from_config(settings, num_classes=10))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model.conv1.dtype == jnp.bfloat16


def test_only_the_seed_and_small_cnns_take_the_backends_convolution():
    # Their convolutions have taken it since they came; giving it to another model would change
    # that model's trained bits (its gradients are added in another order).
    assert {n for n, e in MODELS.items() if e.fast_conv_gradients} == {"cnn", "smallcnn", "smallcnn_bn"}
