"""Models by name. Every model has the same constructor signature and call signature.

Constructor: ``Model(*, num_classes, dropout, width, depth, dtype, rngs)``; ``width`` and
``depth`` of 0 mean the model's own default. Call: ``model(x, train=..., dropout_key=...)``
maps images ``[B, 28, 28, 1]`` to logits ``[B, num_classes]``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from flax import nnx

# Nothing here imports JAX or Flax at module level: the config checks model names against
# MODELS, and the CLI refuses a bad flag before JAX starts. Each model's module is imported
# when a model is built.


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A model of :data:`MODELS`: its class (or ``"module:Class"``, imported when first built),
    what ``jax-mnist models`` says of it, and keyword arguments fixed for this name.

    What else is said of the model lives here too: ``tune_space``, the entries (as in a space
    file) that ``jax-mnist tune`` searches for it by default besides the settings every model
    shares, its width (and depth) around the model's own; and ``cpu_engine``, the engine that
    serves it faster on a CPU (``"jax"`` or ``"onnx"``: ONNX Runtime), which ``jax-mnist
    serve --engine auto`` picks there.

    ``fast_conv_gradients``: its ``nnx.Conv`` layers get the backend's convolution, whose
    gradients XLA:CPU runs fast in loops (``backend.use_fast_conv_gradients``): the same
    parameters, results equal to float32 rounding, so switching it changes a model's bits.

    ``cpu_training_fusions``: the ops XLA:CPU may hand to YNNPACK in this model's training
    chunk (names of ``backend.YNN_FUSION_TYPES``), where they differ from the training
    program's own choice (``backend.compiler_options("train")``); changing it changes the
    model's bits."""

    target: str | Callable[..., nnx.Module]
    description: str
    options: tuple[tuple[str, Any], ...] = ()
    tune_space: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, hash=False)
    cpu_engine: str = "jax"
    fast_conv_gradients: bool = False
    cpu_training_fusions: tuple[str, ...] | None = None

    @property
    def constructor(self) -> Callable[..., nnx.Module]:
        target = self.target
        if isinstance(target, str):
            module, name = target.split(":")
            target = getattr(importlib.import_module(module), name)
        return functools.partial(target, **dict(self.options)) if self.options else target


# cpu_engine="onnx" where ONNX Runtime ran a run's model faster than jitted JAX on a CPU, at
# batch 1 and at batch 1000 alike (benchmarks/inference_engines.py; the table is in docs/performance.md, Inference engines):
# LeNet-5 1.5-2.8x, VGG 1.3-1.5x, ResNet 1.4-1.5x. JAX was faster for the seed CNN and, at
# batch 1000, the MLP. On a GPU JAX runs on the GPU and ONNX Runtime (CPU) would not.
#
# cpu_training_fusions adds element-wise fusions to the training program's reductions and single
# dots for the models whose training chunk ran faster with them (benchmarks/xla_options.py,
# docs/performance.md): the seed CNN 1.18x, smallcnn 1.15x, ResNet 1.07x on JAX 0.10.2.
# YNNPACK then takes the forward convolutions fused with their bias and ReLU. Batch norm's
# smallcnn_bn ran 0.76x as fast with them, and LeNet-5, the MLP and VGG gained nothing.
_FUSED_ELEMENTWISE = ("reduce", "individual_dot", "eltwise")
_SMALLCNN_SPACE: dict[str, dict[str, Any]] = {
    "width": {"choices": [12, 16, 24, 32]},
    "depth": {"type": "int", "low": 2, "high": 3},
}

MODELS: dict[str, ModelEntry] = {
    "cnn": ModelEntry(
        "jax_mnist.models.cnn:CNN",
        "the seed's CNN: 2 conv (32, 64) + avg-pool, dense 256, dropout",
        tune_space={"width": {"choices": [16, 24, 32, 48]}},
        fast_conv_gradients=True,
        cpu_training_fusions=_FUSED_ELEMENTWISE,
    ),
    "lenet5": ModelEntry(
        "jax_mnist.models.lenet:LeNet5",
        "LeNet-5 with ReLU and max-pool: conv 6, 16 (5x5), dense 120, 84",
        tune_space={"width": {"choices": [6, 12, 18, 24]}},
        cpu_engine="onnx",
    ),
    "mlp": ModelEntry(
        "jax_mnist.models.mlp:MLP",
        "multilayer perceptron: --depth x dense --width (2 x 512)",
        tune_space={"width": {"choices": [256, 512, 1024]}, "depth": {"type": "int", "low": 1, "high": 3}},
    ),
    "vgg": ModelEntry(
        "jax_mnist.models.vgg:VGG",
        "VGG-style, batch norm: 3 stages of --depth 3x3 convs (32, 64, 128)",
        tune_space={"width": {"choices": [16, 32, 48]}, "depth": {"type": "int", "low": 1, "high": 3}},
        cpu_engine="onnx",
    ),
    "resnet": ModelEntry(
        "jax_mnist.models.resnet:ResNet",
        "pre-activation ResNet, batch norm: 3 stages of --depth blocks (16, 32, 64)",
        tune_space={"width": {"choices": [8, 16, 32]}, "depth": {"type": "int", "low": 1, "high": 3}},
        cpu_engine="onnx",
        cpu_training_fusions=_FUSED_ELEMENTWISE,
    ),
    "smallcnn": ModelEntry(
        "jax_mnist.models.smallcnn:SmallCNN",
        "the speed runs' CNN: conv 24 (5x5), 32 (3x3) + max-pool, dense 256",
        tune_space=_SMALLCNN_SPACE,
        fast_conv_gradients=True,
        cpu_training_fusions=_FUSED_ELEMENTWISE,
    ),
    "smallcnn_bn": ModelEntry(
        "jax_mnist.models.smallcnn:SmallCNN",
        "smallcnn with batch norm after each convolution",
        options=(("batch_norm", True),),
        tune_space=_SMALLCNN_SPACE,
        fast_conv_gradients=True,
    ),
}


# The dtypes a model may compute in (``--dtype``), by name; parameters stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str) -> Any:
    """The JAX dtype named ``name`` in a config (one of :data:`COMPUTE_DTYPES`)."""
    import jax.numpy as jnp

    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    return getattr(jnp, name)


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    dropout: float = 0.0,
    width: int = 0,
    depth: int = 0,
    dtype: Any = None,
    seed: int = 0,
) -> nnx.Module:
    """Model ``name`` with parameters initialized from ``seed``, computing in ``dtype`` (a JAX
    dtype; None is float32), built op by op: call it where JAX traces (under ``jax.jit`` or
    ``nnx.eval_shape``), or call :func:`create_model`, which compiles it. The backend's
    convolution goes in when the entry asks for it (``fast_conv_gradients``)."""
    import jax.numpy as jnp
    from flax import nnx

    entry = MODELS[name]
    model = entry.constructor(
        num_classes=num_classes,
        dropout=dropout,
        width=width,
        depth=depth,
        dtype=jnp.float32 if dtype is None else dtype,
        rngs=nnx.Rngs(params=seed),
    )
    if entry.fast_conv_gradients:
        from jax_mnist.backend import use_fast_conv_gradients

        model = use_fast_conv_gradients(model)
    return model


def initialize(build: Callable[[], nnx.Module]) -> nnx.Module:
    """The model ``build()`` makes, its parameters computed in one compiled program.

    Run eagerly, each initializer would be dispatched and compiled op by op: about 5 s for the
    seed CNN on a 2-core CPU, against 1.5 s; the parameters are the same bits either way.
    """
    import jax
    from flax import nnx

    from jax_mnist.backend import compiler_options

    graphdef = nnx.graphdef(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()), compiler_options=compiler_options("init"))()
    return nnx.merge(graphdef, state)


def create_model(name: str, **kwargs: Any) -> nnx.Module:
    """Builds model ``name``, initialized: :func:`build_model`'s arguments, compiled by
    :func:`initialize`."""
    return initialize(functools.partial(build_model, name, **kwargs))


class ModelSettings(Protocol):
    """What :func:`model_from_config` reads: a :class:`~jax_mnist.config.Config` has these.

    Spelled out here so that the models need nothing from the config module (which looks the
    model names up in :data:`MODELS` when it validates).
    """

    @property
    def model(self) -> str: ...
    @property
    def dropout(self) -> float: ...
    @property
    def width(self) -> int: ...
    @property
    def depth(self) -> int: ...
    @property
    def dtype(self) -> str: ...  # one of COMPUTE_DTYPES
    @property
    def seed(self) -> int: ...


def model_from_config(config: ModelSettings, num_classes: int) -> Callable[[], nnx.Module]:
    """A function that builds the model ``config`` describes, initialized from its seed.

    Training and restoring both build through this one function, so a checkpoint's structure
    is the one its config describes. It builds op by op (:func:`build_model`): call it where
    JAX traces, under ``nnx.eval_shape`` for the structure alone (no parameters are computed),
    or pass it to :func:`initialize`.
    """
    return functools.partial(
        build_model,
        config.model,
        num_classes=num_classes,
        dropout=config.dropout,
        width=config.width,
        depth=config.depth,
        dtype=compute_dtype(config.dtype),
        seed=config.seed,
    )


def split_variables(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The model's structure, its parameters (``nnx.Param``) and the rest of its variables
    (batch-norm statistics)."""
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # a variadic tuple
    return graphdef, params, rest


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters of ``model`` (a model, or its shapes from ``nnx.eval_shape``)."""
    import jax
    from flax import nnx

    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(name: str, **kwargs) -> nnx.Module:
    """Model ``name`` with shapes and dtypes in place of its parameters: nothing is computed."""
    from flax import nnx

    return nnx.eval_shape(functools.partial(build_model, name, **kwargs))


def flops_per_image(model: nnx.Module) -> float:
    """Forward-pass FLOPs for one 28x28 image, as XLA counts them (multiply-add = 2).

    Counted on the lowered program, which is not compiled; ``model`` may be abstract
    (:func:`abstract_model`). XLA:CPU counts, whatever the default backend: GPU backends do
    not analyse a program before compiling it, and one count keeps ``jax-mnist models`` the
    same on every machine."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x, train=False)

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

    def on_cpu(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu)

    x = on_cpu(jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    cost = jax.jit(forward).lower(jax.tree.map(on_cpu, state), x).cost_analysis()
    if not cost:
        raise RuntimeError("XLA gave no cost analysis of the forward pass")
    return float(cost["flops"])
