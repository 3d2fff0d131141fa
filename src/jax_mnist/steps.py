"""Pure functions that run on the device: the loss, one training step, a chunk of steps,
and one evaluation step on the same loss. State goes in and comes out; nothing here touches the host.

Shapes: images are uint8 ``[N, 28, 28]`` as stored on the device; the model sees float
``[B, 28, 28, 1]``; labels are int ``[B]``; logits float32 ``[B, C]``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax import lax

from jax_mnist import backend
from jax_mnist.augment import AugmentSettings, augment

PyTree = Any


@struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree, saved whole in checkpoints.

    Attributes:
      step: int32 scalar, training steps done so far (global, across epochs).
      params: trainable parameters, a nested dict of arrays.
      model_state: non-trainable model variables (batch-norm statistics), a nested dict.
      opt_state: the optimizer's state.
      ema_params: moving average of ``params`` used for evaluation, or ``{}`` when off.
      ema_model_state: moving average of ``model_state`` at the same decay (the batch-norm
        statistics that go with the averaged weights), or ``{}`` when off.
      key: uint32 ``[2]`` raw PRNG key; step ``s`` uses ``fold_in(key, s)`` for dropout and
        augmentation, so any step's randomness is known without replaying earlier ones.
      data_key: uint32 ``[2]`` raw PRNG key; epoch ``e`` shuffles with ``fold_in(data_key, e)``.
      epoch_sums: running sums over the current epoch (``loss`` f32, ``correct`` and
        ``count`` int32), kept here so a resumed epoch reports the same metrics.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    ema_params: PyTree
    ema_model_state: PyTree
    key: jax.Array
    data_key: jax.Array
    epoch_sums: dict[str, jax.Array]

    if TYPE_CHECKING:  # flax.struct.dataclass adds it; spelled out for type checkers

        def replace(self, **changes: Any) -> TrainState: ...


# Running sums of steps: ``loss`` float32, ``correct`` and ``count`` int32 scalars.
Sums = dict[str, Any]
# The weights and batch statistics a model is evaluated with: ``{"params", "model_state"}``.
Variables = dict[str, PyTree]


def zero_sums() -> Sums:
    """Sums of no steps; NumPy scalars, so the host puts them where they belong."""
    return {"loss": np.float32(0), "correct": np.int32(0), "count": np.int32(0)}


def sums_to_json(sums: Sums) -> dict[str, float | int]:
    """Host sums as JSON numbers (float32 -> Python float -> float32 is exact, so a resumed run
    logs the same numbers)."""
    return {"loss": float(sums["loss"]), "correct": int(sums["correct"]), "count": int(sums["count"])}


def sums_from_json(values: dict[str, float | int]) -> Sums:
    """The sums :func:`sums_to_json` wrote, with their dtypes."""
    return {
        "loss": np.float32(values["loss"]),
        "correct": np.int32(values["correct"]),
        "count": np.int32(values["count"]),
    }


def eval_variable_names(ema_decay: float) -> tuple[str, str]:
    """The fields of a :class:`TrainState` (and of a checkpoint) that hold the weights and
    batch statistics to evaluate: their moving averages when the run keeps them."""
    return ("ema_params", "ema_model_state") if ema_decay else ("params", "model_state")


def eval_variables(state: TrainState, ema_decay: float) -> Variables:
    """The weights and batch statistics of ``state`` to evaluate (see :func:`eval_variable_names`)."""
    params, model_state = eval_variable_names(ema_decay)
    return {"params": getattr(state, params), "model_state": getattr(state, model_state)}


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static (hashable) settings the jitted functions are specialized on."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    num_classes: int
    mean: float
    std: float
    compute_dtype: Any = jnp.float32
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    augment: AugmentSettings = dataclasses.field(default_factory=AugmentSettings)
    # Sharding of a batch across the data-parallel mesh; None on a single device.
    batch_sharding: jax.sharding.NamedSharding | None = None


def to_model_input(images: jax.Array, mean: float, std: float, dtype=jnp.float32) -> jax.Array:
    """uint8 or [0, 1] float ``[B, H, W]`` -> normalized ``[B, H, W, 1]`` in ``dtype``."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return ((images - mean) / std)[..., None].astype(dtype)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example softmax cross-entropy ``[B]`` with optional label smoothing.

    The targets are one-hot rows (a comparison with ``arange``), never an index into the
    logits: the gradient of indexing (``softmax_cross_entropy_with_integer_labels``) is a
    scatter-add, which deterministic GPU kernels serialize.
    """
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def loss_fn(
    params: PyTree,
    model_state: PyTree,
    images: jax.Array,
    labels: jax.Array,
    settings: StepSettings,
    *,
    train: bool,
    dropout_key: jax.Array | None = None,
):
    """Mean loss over the batch, with the logits and the updated model state.

    Args:
      params: the model's parameters.
      model_state: the model's other variables (batch-norm statistics).
      images: normalized float ``[B, 28, 28, 1]``.
      labels: int ``[B]``.

    Returns:
      ``(loss, (logits [B, C], new_model_state))``.
    """
    model = nnx.merge(settings.graphdef, params, model_state)
    logits = model(images, train=train, dropout_key=dropout_key).astype(jnp.float32)
    loss = cross_entropy(logits, labels, settings.num_classes, settings.label_smoothing).mean()
    new_model_state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    return loss, (logits, new_model_state)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The weight EMA's decay at ``step``: ``min(decay, (1 + step) / (10 + step))``.

    A fixed decay such as 0.999 would keep most of the random initial weights in the average
    for thousands of steps; the ramp lets the average follow the weights early in training.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(
    state: TrainState, images: jax.Array, labels: jax.Array, settings: StepSettings
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of uint8 images ``[B, 28, 28]`` and labels ``[B]``.

    Returns the new state and the batch's summed loss, correct count and size.
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    aug_key, dropout_key = jax.random.split(step_key)
    x = images.astype(jnp.float32) / 255.0
    x = augment(aug_key, x, settings.augment)
    x = to_model_input(x, settings.mean, settings.std, settings.compute_dtype)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, model_state)), grads = grad_fn(
        state.params, state.model_state, x, labels, settings, train=True, dropout_key=dropout_key
    )
    updates, opt_state = settings.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params, ema_model_state = state.ema_params, state.ema_model_state
    if settings.ema_decay:
        # The batch statistics are averaged with the weights: the averaged weights evaluated
        # with the live model's statistics see activations of another scale.
        decay = ema_decay_at(state.step, settings.ema_decay)
        ema_params = optax.incremental_update(params, ema_params, 1.0 - decay)
        ema_model_state = optax.incremental_update(model_state, ema_model_state, 1.0 - decay)

    # The logged loss is the plain cross-entropy, the quantity validation and test report;
    # with label smoothing the optimized loss is larger by a term unrelated to accuracy.
    if settings.label_smoothing:
        loss = cross_entropy(logits, labels, settings.num_classes).mean()
    batch = labels.shape[0]
    sums = {
        "loss": loss * batch,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.int32),
        "count": jnp.asarray(batch, jnp.int32),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        ema_params=ema_params,
        ema_model_state=ema_model_state,
        epoch_sums=jax.tree.map(jnp.add, state.epoch_sums, sums),
    )
    return new_state, sums


def train_chunk(
    state: TrainState,
    order: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    settings: StepSettings,
    num_steps: int,
    batch_size: int,
    steps_per_epoch: int,
    sums: dict[str, jax.Array] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Runs ``num_steps`` training steps in one device call, batches sliced on the device.

    The steps run in a ``lax.scan`` (compiled once, buffers reused from step to step) when
    the step loops well on the backend: on XLA:CPU, a convolution gradient that is not in the
    canonical layout runs 6 to 60 times slower inside a while loop than at the top level, so
    models whose gradients are not all canonical get a straight line of unrolled steps
    instead (``backend.scan_steps``; see docs/performance.md, What XLA:CPU does well and badly here).

    Args:
      state: the training state; ``state.step % steps_per_epoch`` is the position in the epoch.
      order: int32 ``[N]``, this epoch's permutation of the training examples.
      images: uint8 ``[N, 28, 28]``, the whole training set on the device.
      labels: int32 ``[N]``.
      num_steps: static; the chunk must not cross the end of the epoch.
      sums: running sums (``loss`` f32, ``correct`` and ``count`` int32 scalars) that the
        chunk's steps are added to, one by one; zeros when None. Carrying them from call to
        call keeps the sums on the device without a separately compiled addition.

    Returns:
      The new state and ``sums`` plus the chunk's summed loss, correct count and example count.
    """

    def one_step(carry, _):
        state, sums = carry
        start = (state.step % steps_per_epoch) * batch_size
        index = lax.dynamic_slice_in_dim(order, start, batch_size)
        if settings.batch_sharding is not None:
            # Each device gathers only its shard of the batch from its copy of the data.
            index = lax.with_sharding_constraint(index, settings.batch_sharding)
        state, step_sums = train_step(state, images[index], labels[index], settings)
        return (state, jax.tree.map(jnp.add, sums, step_sums)), None

    return backend.scan_steps(one_step, (state, zero_sums() if sums is None else sums), num_steps)


def eval_step(
    apply: Any,
    variables: Variables,
    images: jax.Array,
    labels: jax.Array,
    num_valid: jax.Array,
    sums: Sums,
    *,
    num_classes: int,
) -> tuple[jax.Array, Sums]:
    """Evaluates one batch: the training step's :func:`cross_entropy`, summed on the device.

    Args:
      apply: ``(variables, images [B, 28, 28]) -> logits [B, C]``, the model in inference mode.
      images: ``[B, 28, 28]``, the first ``num_valid`` real and the rest padding.
      labels: int ``[B]``, padded alike.
      num_valid: int scalar, how many rows of the batch count.
      sums: running sums (``loss`` f32, ``correct`` and ``count`` int32) the batch is added to.

    Returns:
      The logits float32 ``[B, C]`` (padding rows included) and ``sums`` plus the batch's
      summed cross-entropy, correct count and size, padding rows left out.
    """
    logits = apply(variables, images)
    valid = jnp.arange(labels.shape[0]) < num_valid
    loss = jnp.where(valid, cross_entropy(logits, labels, num_classes), 0.0)
    batch = {
        "loss": jnp.sum(loss),
        "correct": jnp.sum(valid & (jnp.argmax(logits, -1) == labels)).astype(jnp.int32),
        "count": jnp.asarray(num_valid, jnp.int32),
    }
    return logits, jax.tree.map(jnp.add, sums, batch)


def mean_metrics(sums: Sums) -> dict[str, float]:
    """Mean ``loss`` and ``accuracy`` of host ``sums`` (as :func:`eval_step` or the training
    steps add them up)."""
    return {
        "loss": float(sums["loss"] / sums["count"]),
        "accuracy": float(sums["correct"] / sums["count"]),
    }


def epoch_order(key: jax.Array, epoch: jax.Array, num_examples: int) -> jax.Array:
    """The permutation of the training set for ``epoch``: int32 ``[num_examples]``."""
    epoch_key = jax.random.fold_in(jax.random.wrap_key_data(key), epoch)
    return jax.random.permutation(epoch_key, num_examples).astype(jnp.int32)


def forward(
    graphdef: nnx.GraphDef,
    params: PyTree,
    model_state: PyTree,
    images: jax.Array,
    *,
    mean: float,
    std: float,
    compute_dtype: Any = jnp.float32,
) -> jax.Array:
    """Logits float32 ``[B, C]`` for uint8 or [0, 1] float images ``[B, 28, 28]``, in inference mode."""
    x = to_model_input(images, mean, std, compute_dtype)
    model = nnx.merge(graphdef, params, model_state)
    return model(x, train=False).astype(jnp.float32)


def apply_variables(variables: Variables, images: jax.Array, settings: StepSettings) -> jax.Array:
    """Logits float32 ``[N, C]`` of the images ``[N, 28, 28]``: :func:`forward` with the
    settings of a training run."""
    return forward(
        settings.graphdef,
        variables["params"],
        variables["model_state"],
        images,
        mean=settings.mean,
        std=settings.std,
        compute_dtype=settings.compute_dtype,
    )
