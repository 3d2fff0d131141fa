"""Models by name. Every model has the same constructor signature and call signature.

Constructor: ``Model(*, num_classes, dropout, width, depth, dtype, rngs)``; ``width`` and
``depth`` of 0 mean the model's own default. Call: ``model(x, train=..., dropout_key=...)``
maps images ``[B, 28, 28, 1]`` to logits ``[B, num_classes]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mnist.models.cnn import CNN
from jax_mnist.models.lenet import LeNet5
from jax_mnist.models.mlp import MLP
from jax_mnist.models.resnet import ResNet
from jax_mnist.models.smallcnn import SmallCNN
from jax_mnist.models.vgg import VGG


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    constructor: Callable[..., nnx.Module]
    description: str


MODELS: dict[str, ModelEntry] = {
    "cnn": ModelEntry(CNN, "the seed's CNN: 2 conv (32, 64) + avg-pool, dense 256, dropout"),
    "lenet5": ModelEntry(LeNet5, "LeNet-5 with ReLU and max-pool: conv 6, 16 (5x5), dense 120, 84"),
    "mlp": ModelEntry(MLP, "multilayer perceptron: --depth x dense --width (2 x 512)"),
    "vgg": ModelEntry(VGG, "VGG-style, batch norm: 3 stages of --depth 3x3 convs (32, 64, 128)"),
    "resnet": ModelEntry(
        ResNet, "pre-activation ResNet, batch norm: 3 stages of --depth blocks (16, 32, 64)"
    ),
    "smallcnn": ModelEntry(SmallCNN, "the speed runs' CNN: conv 24 (5x5), 32 (3x3) + max-pool, dense 256"),
    "smallcnn_bn": ModelEntry(
        functools.partial(SmallCNN, batch_norm=True), "smallcnn with batch norm after each convolution"
    ),
}


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    dropout: float = 0.0,
    width: int = 0,
    depth: int = 0,
    dtype: jnp.dtype = jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """Builds model ``name`` with parameters initialized from ``seed``."""
    return MODELS[name].constructor(
        num_classes=num_classes,
        dropout=dropout,
        width=width,
        depth=depth,
        dtype=dtype,
        rngs=nnx.Rngs(params=seed),
    )


class ModelSettings(Protocol):
    """What :func:`model_from_config` reads: a :class:`~jax_mnist.config.Config` has these.

    Spelled out here so that the models need nothing from the config module (which looks the
    model names up in :data:`MODELS` when it validates).
    """

    model: str
    dropout: float
    width: int
    depth: int
    dtype: str  # "float32" or "bfloat16"
    seed: int


def model_from_config(config: ModelSettings, num_classes: int) -> Callable[[], nnx.Module]:
    """A function that builds the model ``config`` describes, initialized from its seed.

    Training and restoring both build through this one function, so a checkpoint's structure
    is the one its config describes. Call it under ``nnx.eval_shape`` for the structure alone
    (no parameters are computed).
    """
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    return functools.partial(
        create_model,
        config.model,
        num_classes=num_classes,
        dropout=config.dropout,
        width=config.width,
        depth=config.depth,
        dtype=dtype,
        seed=config.seed,
    )


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters of ``model`` (a model, or its shapes from ``nnx.eval_shape``)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(name: str, **kwargs) -> nnx.Module:
    """Model ``name`` with shapes and dtypes in place of its parameters: nothing is computed."""
    return nnx.eval_shape(functools.partial(create_model, name, **kwargs))


def flops_per_image(model: nnx.Module) -> float:
    """Forward-pass FLOPs for one 28x28 image, as XLA counts them (multiply-add = 2).

    Counted on the lowered program, which is not compiled; ``model`` may be abstract
    (:func:`abstract_model`). XLA:CPU counts, whatever the default backend: GPU backends do
    not analyse a program before compiling it, and one count keeps ``jax-mnist models`` the
    same on every machine."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x, train=False)

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

    def on_cpu(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu)

    x = on_cpu(jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    cost = jax.jit(forward).lower(jax.tree.map(on_cpu, state), x).cost_analysis()
    return float(cost["flops"])
