"""A trained model for inference: restored from a run directory without its optimizer.

:func:`load_model` is the one way a trained model is brought back to be used: ``evaluate``,
``predict``, ``serve`` and ``export`` all start from the :class:`InferenceModel` it returns.
It reads the config stored with the checkpoint, builds the model's structure from it (no
parameters are computed), and restores only the evaluation weights and batch statistics
(the moving averages when the run kept them); the optimizer's state stays on disk.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mnist import steps
from jax_mnist.backend import compiler_options
from jax_mnist.checkpoint import Checkpoints
from jax_mnist.config import Config
from jax_mnist.data.datasets import DATASETS, DatasetInfo
from jax_mnist.errors import UserError
from jax_mnist.metrics import average_predictions
from jax_mnist.models import compute_dtype, initialize, model_from_config, split_variables
from jax_mnist.parallel import put_replicated, replicate, to_host
from jax_mnist.steps import Variables

# Test-time augmentation: the image itself and one-pixel shifts down, up, right and left.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


@dataclasses.dataclass(frozen=True)
class InferenceModel:
    """A trained model: its definition, evaluation weights and preprocessing constants.

    Attributes:
      config: the config the model was trained with.
      info: the dataset's classes and pixel statistics (``mean``, ``std`` of [0, 1] pixels).
      graphdef: the model's structure (Flax NNX).
      variables: ``{"params", "model_state"}``: the weights and batch statistics to evaluate
        (their moving averages when the run trained with ``--ema-decay``).
      meta: what the checkpoint records: ``step``, ``epoch``, validation metrics.
      workdir: the run directory it came from.
    """

    config: Config
    info: DatasetInfo
    graphdef: nnx.GraphDef
    variables: Variables
    meta: dict[str, Any]
    workdir: Path | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.variables["params"]))

    def apply(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Logits float32 ``[N, C]`` for uint8 or [0, 1] float images ``[N, 28, 28]``.

        Pure and traceable (for ``jax.jit`` and ``jax.export``): normalization happens
        inside, so a caller feeds raw pixels.
        """
        return steps.forward(
            self.graphdef,
            variables["params"],
            variables["model_state"],
            images,
            mean=self.info.mean,
            std=self.info.std,
            compute_dtype=compute_dtype(self.config.dtype),
        )

    @functools.cached_property
    def _predict(self) -> Callable[..., np.ndarray]:
        # On one device: what is loaded for inference lives on the first (load_model).
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        return make_batched_predict(self.apply, mesh, self.num_classes)

    @functools.cached_property
    def _evaluate(self) -> Callable[..., tuple[np.ndarray, dict[str, float]]]:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        return make_batched_evaluate(self.apply, mesh, self.num_classes)

    def predict_logits(
        self, images: np.ndarray, *, tta: bool = False, batch_size: int | None = None
    ) -> np.ndarray:
        """Logits float32 ``[N, C]`` for uint8 or [0, 1] float images ``[N, 28, 28]``.

        Images go through :func:`make_batched_predict` in batches of at most ``batch_size``
        (default: the run's ``eval_batch_size``).

        With ``tta``, the log of the softmax probabilities averaged over the images and
        their copies shifted by one pixel in each direction (:data:`TTA_SHIFTS`).
        """
        images = check_images(images)
        if tta:
            return tta_logits(functools.partial(self.predict_logits, batch_size=batch_size), images)
        return self._predict(self.variables, images, batch_size or self.config.eval_batch_size)

    def evaluate(
        self, images: np.ndarray, labels: np.ndarray, *, tta: bool = False, batch_size: int | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Logits float32 ``[N, C]`` of images ``[N, 28, 28]`` with labels ``[N]``, and their mean
        ``loss`` and ``accuracy``: :func:`make_batched_evaluate`'s, or with ``tta``
        :func:`logits_metrics` of :meth:`predict_logits`' averaged logits."""
        images = check_images(images)
        if tta:
            logits = self.predict_logits(images, tta=True, batch_size=batch_size)
            return logits, logits_metrics(logits, labels, self.num_classes)
        return self._evaluate(self.variables, images, labels, batch_size or self.config.eval_batch_size)

    def describe(self) -> dict[str, Any]:
        """What is loaded, as JSON-able facts: architecture, size, source run and checkpoint."""
        return {
            "model": self.config.model,
            "width": self.config.width,
            "depth": self.config.depth,
            "dtype": self.config.dtype,
            "parameters": self.num_params,
            "dataset": self.config.dataset,
            "classes": list(self.class_names),
            "run": str(self.workdir) if self.workdir else None,
            "step": self.meta.get("step"),
            "epoch": self.meta.get("epoch"),
            "val_accuracy": self.meta.get("val_accuracy"),
            "test_accuracy": test_accuracy(self.workdir) if self.workdir else None,
        }


def check_images(images: np.ndarray) -> np.ndarray:
    """``images`` as an array, which must be ``[N, 28, 28]``; a one-line error otherwise."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserError(f"expected images of shape [N, 28, 28], got {list(images.shape)}")
    return images


def tta_logits(predict, images: np.ndarray) -> np.ndarray:
    """Log of the softmax probabilities of ``predict`` (images -> logits ``[N, C]``) averaged
    over ``images`` and their one-pixel shifts (:data:`TTA_SHIFTS`); float32 ``[N, C]``."""
    return average_predictions([predict(shift_images(images, dy, dx)) for dy, dx in TTA_SHIFTS]).astype(
        np.float32
    )


def logits_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Mean ``loss`` and ``accuracy`` of logits ``[N, C]`` computed already (an ensemble's, or
    test-time augmentation's): :func:`~jax_mnist.steps.eval_step` with the logits as the model."""
    logits, labels = np.asarray(logits, np.float32), np.asarray(labels, np.int32)
    _, sums = _eval_logits(
        None, logits, labels, np.int32(len(labels)), steps.zero_sums(), num_classes=num_classes
    )
    return steps.mean_metrics(to_host(sums))


def _given_logits(_: Any, logits: jax.Array) -> jax.Array:
    return logits


_eval_logits = jax.jit(functools.partial(steps.eval_step, _given_logits), static_argnames="num_classes")


def padded_size(n: int, limit: int, multiple: int = 1) -> int:
    """The size a batch of ``n`` images is padded to: the next power of two, rounded up to a
    multiple of ``multiple`` (the devices it is split over), at most ``limit``, so a compiled
    function sees a few shapes however many images come, and one image is not padded to a
    thousand."""
    return min(limit, -(-(1 << (n - 1).bit_length()) // multiple) * multiple)


def run_in_batches(
    fn: Callable[[np.ndarray], Any],
    images: np.ndarray,
    limit: int,
    num_classes: int,
    *,
    pad: bool = True,
    multiple: int = 1,
    one_shape: bool = False,
) -> np.ndarray:
    """``fn`` (images ``[B, 28, 28]`` -> logits ``[B, C]``) over ``images`` in batches of ``limit``.

    With ``pad``, each batch is padded with zeros to :func:`padded_size`, or with ``one_shape``
    to ``limit``: one shape compiled, for callers that see one size of input. Every batch is
    handed to ``fn`` before any result is read back, so device calls queue up behind each
    other. Returns float32 logits ``[N, C]`` as NumPy.
    """
    outputs = []
    for start in range(0, len(images), limit):
        batch = images[start : start + limit]
        if pad:
            batch = _pad(batch, limit if one_shape else padded_size(len(batch), limit, multiple))
        outputs.append((fn(batch), min(limit, len(images) - start)))
    return _concatenate(outputs, num_classes)


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` ``[n, ...]`` followed by zeros up to ``[size, ...]``."""
    padded = np.zeros((size, *batch.shape[1:]), batch.dtype)
    padded[: len(batch)] = batch
    return padded


def _concatenate(outputs: list[tuple[Any, int]], num_classes: int) -> np.ndarray:
    """The first ``n`` rows of each ``(logits, n)`` of ``outputs``, read back and joined."""
    if not outputs:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate([np.asarray(to_host(logits))[:n] for logits, n in outputs])


def make_batched_predict(
    apply: Callable[[Variables, jax.Array], jax.Array],
    mesh: jax.sharding.Mesh,
    num_classes: int,
    *,
    one_shape: bool = False,
) -> Callable[..., np.ndarray]:
    """The one predictor: ``(variables, images [N, 28, 28], batch_size) -> logits`` float32
    ``[N, C]`` (NumPy), for validation and test during training, ``evaluate``, ``predict``,
    ``serve`` and export's checks.

    ``apply(variables, images [B, 28, 28]) -> logits [B, C]`` is jitted once; ``variables``
    must already be on ``mesh`` (replicated). Images are cut into batches on the host (at most
    ``batch_size``, rounded up to a multiple of the mesh's devices), each padded by
    :func:`run_in_batches` (to a full batch with ``one_shape``), copied to every device, and
    split over the devices along the batch: each device computes its share.
    """
    num_devices = mesh.devices.size
    batch_sharding = NamedSharding(mesh, P("data"))

    @functools.partial(jax.jit, out_shardings=replicate(mesh), compiler_options=compiler_options("eval"))
    def forward(variables: Variables, images: jax.Array) -> jax.Array:
        return apply(variables, jax.lax.with_sharding_constraint(images, batch_sharding))

    def predict(variables: Variables, images: np.ndarray, batch_size: int) -> np.ndarray:
        limit = -(-batch_size // num_devices) * num_devices
        return run_in_batches(
            lambda batch: forward(variables, put_replicated(batch, mesh)),
            np.asarray(to_host(images)),
            limit,
            num_classes,
            multiple=num_devices,
            one_shape=one_shape,
        )

    return predict


def make_batched_evaluate(
    apply: Callable[[Variables, jax.Array], jax.Array],
    mesh: jax.sharding.Mesh,
    num_classes: int,
    *,
    one_shape: bool = False,
) -> Callable[..., tuple[np.ndarray, dict[str, float]]]:
    """The predictor's sibling for labelled images: ``(variables, images [N, 28, 28], labels
    [N], batch_size) -> (logits, metrics)``, the logits float32 ``[N, C]`` (NumPy) and
    ``metrics`` the mean ``loss`` and ``accuracy``, for validation and test in training and
    ``evaluate``.

    Batches are cut, padded and split over ``mesh`` as :func:`make_batched_predict` does;
    each runs :func:`~jax_mnist.steps.eval_step`, which adds the batch's cross-entropy (the
    training step's) and correct count to sums kept on the devices, padding rows left out;
    the host reads the sums once, at the end. ``N`` must be at least 1.
    """
    num_devices = mesh.devices.size
    batch_sharding = NamedSharding(mesh, P("data"))

    def sharded_apply(variables: Variables, images: jax.Array) -> jax.Array:
        return apply(variables, jax.lax.with_sharding_constraint(images, batch_sharding))

    step = jax.jit(
        functools.partial(steps.eval_step, sharded_apply, num_classes=num_classes),
        out_shardings=replicate(mesh),
        compiler_options=compiler_options("eval"),
    )

    def evaluate(
        variables: Variables, images: np.ndarray, labels: np.ndarray, batch_size: int
    ) -> tuple[np.ndarray, dict[str, float]]:
        limit = -(-batch_size // num_devices) * num_devices
        images, labels = np.asarray(to_host(images)), np.asarray(labels, np.int32)
        sums, outputs = put_replicated(steps.zero_sums(), mesh), []
        for start in range(0, len(images), limit):
            n = min(limit, len(images) - start)
            size = limit if one_shape else padded_size(n, limit, num_devices)
            batch = (
                _pad(images[start : start + n], size),
                _pad(labels[start : start + n], size),
                np.int32(n),
            )
            logits, sums = step(variables, *put_replicated(batch, mesh), sums)
            outputs.append((logits, n))
        return _concatenate(outputs, num_classes), steps.mean_metrics(to_host(sums))

    return evaluate


def shift_images(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Images ``[N, H, W]`` moved ``dy`` pixels down and ``dx`` right, the edge filled with 0."""
    shifted = np.zeros_like(images)
    h, w = images.shape[1:]
    shifted[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return shifted


def test_accuracy(workdir: Path) -> float | None:
    """The test accuracy a finished run recorded in its ``metrics.jsonl``, or None."""
    from jax_mnist.report import read_metrics

    records = [r for r in read_metrics(workdir / "metrics.jsonl") if r.get("kind") == "test"]
    return records[-1].get("test_accuracy") if records else None


def abstract_variables(config: Config, info: DatasetInfo) -> tuple[nnx.GraphDef, Variables]:
    """The model's structure and the shapes of its variables, computing no parameters."""
    graphdef, params, model_state = split_variables(
        nnx.eval_shape(model_from_config(config, info.num_classes))
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(tree)
        )

    return graphdef, {"params": abstract(params), "model_state": abstract(model_state)}


def load_model(workdir: str | Path, which: str | int = "best", *, warn=print) -> InferenceModel:
    """Restores the model a run trained, for inference, without its optimizer.

    Args:
      workdir: the run directory.
      which: ``best`` (by validation accuracy; the latest when the run had no validation
        split), ``latest`` or a step number.
      warn: called with a line for each damaged checkpoint passed over.

    Raises:
      UserError: no such run, no checkpoint, or none that can be read.
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"{workdir}: no such run directory")
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        config = checkpoints.read_config(which)
        info = DATASETS[config.dataset]
        graphdef, variables = abstract_variables(config, info)
        names = steps.eval_variable_names(config.ema_decay)
        abstract = dict(zip(names, (variables["params"], variables["model_state"]), strict=True))
        restored = checkpoints.restore(abstract, which, partial=True, warn=warn)
    finally:
        checkpoints.close()
    if restored is None:
        raise UserError(f"{workdir}: no checkpoint to restore; train first")
    state, meta = restored
    variables = {"params": state[names[0]], "model_state": state[names[1]]}
    return InferenceModel(config, info, graphdef, variables, meta, workdir)


def untrained_model(name: str, *, seed: int = 0, **config_changes) -> InferenceModel:
    """Model ``name`` with random weights and random batch-norm statistics, as if trained.

    For checking and timing inference runtimes without a training run: the moving means
    (normal, sd 0.5) and variances (uniform in [0.5, 2]) are drawn from ``seed`` instead of
    the initial 0 and 1, so batch normalization does real work.
    """
    config = Config(model=name, seed=seed, **config_changes).validate()
    info = DATASETS[config.dataset]
    model = initialize(model_from_config(config, info.num_classes))
    graphdef, param_vars, other_vars = split_variables(model)
    params, model_state = nnx.to_pure_dict(param_vars), nnx.to_pure_dict(other_vars)
    rng = np.random.default_rng(seed)

    def randomize(path, x):
        if path[-1].key == "mean":
            return jnp.asarray(rng.normal(0.0, 0.5, x.shape), x.dtype)
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
        return x

    variables = {"params": params, "model_state": jax.tree_util.tree_map_with_path(randomize, model_state)}
    return InferenceModel(config, info, graphdef, variables, {"step": 0})
