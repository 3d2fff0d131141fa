"""``train_and_evaluate(config, workdir)``: the training loop, from data to test accuracy.

The loop runs on the device in chunks of up to ``log_every`` steps: the host queues jitted
calls of ``steps_per_call`` steps each, every step slicing its batch from the dataset already
on the device, and waits only at the chunk's end, when it reads the summed loss. Between
chunks the host logs, evaluates at epoch ends, saves checkpoints and notices Ctrl-C; inside a
chunk nothing waits on Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mnist import backend, runtime, steps
from jax_mnist.augment import AugmentSettings
from jax_mnist.checkpoint import Checkpoints, write_error
from jax_mnist.config import Config
from jax_mnist.data import Arrays, load_dataset
from jax_mnist.data.datasets import DATASETS, DatasetInfo, split_validation
from jax_mnist.errors import UserError, write_failure
from jax_mnist.logs import RunLogger
from jax_mnist.metrics import classification_metrics
from jax_mnist.models import model_from_config
from jax_mnist.optim import create_optimizer
from jax_mnist.parallel import (
    agree_on_signal,
    create_mesh,
    is_main_process,
    put_replicated,
    replicate,
    to_host,
)
from jax_mnist.plan import plan_chunks
from jax_mnist.resume import resolve_run
from jax_mnist.rundir import TRAIN_HOLDER, TRAIN_LOCK, DirectoryLock, write_atomically
from jax_mnist.signals import StopSignals


class TrainingInterrupted(UserError):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a config turns into before training: model definition, optimizer, step settings."""

    config: Config
    info: DatasetInfo
    settings: steps.StepSettings
    mesh: jax.sharding.Mesh
    initial_state: Any  # a function () -> TrainState


def create_setup(config: Config, steps_per_epoch: int, mesh: jax.sharding.Mesh | None = None) -> Setup:
    """Builds the model, optimizer and step settings that ``config`` describes."""
    info = DATASETS[config.dataset]
    mesh = mesh or create_mesh(config.devices, config.batch_size)
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    tx = create_optimizer(config, steps_per_epoch)
    make_model = model_from_config(config, info.num_classes)

    graphdef, _, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
    settings = steps.StepSettings(
        graphdef=graphdef,
        tx=tx,
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        compute_dtype=dtype,
        label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay,
        augment=AugmentSettings(config.aug_shift, config.aug_rotate, config.aug_scale, config.aug_elastic),
        batch_sharding=NamedSharding(mesh, P("data")),
    )

    def initial_state() -> steps.TrainState:
        _, params, model_state = nnx.split(make_model(), nnx.Param, ...)
        params, model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
        root = jax.random.key(config.seed)
        return steps.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params) if config.ema_decay else {},
            ema_model_state=jax.tree.map(jnp.copy, model_state) if config.ema_decay else {},
            key=jax.random.key_data(jax.random.fold_in(root, 1)),
            data_key=jax.random.key_data(jax.random.fold_in(root, 2)),
            epoch_sums=steps.zero_sums(),
        )

    return Setup(config, info, settings, mesh, initial_state)


def create_train_state(setup: Setup) -> steps.TrainState:
    """The initial training state, replicated over the mesh: a program that runs once, so
    compiled for speed of compiling (:func:`~jax_mnist.runtime.run_once_compiler_options`)."""
    return jax.jit(
        setup.initial_state,
        out_shardings=replicate(setup.mesh),
        compiler_options=runtime.run_once_compiler_options(),
    )()


def abstract_train_state(setup: Setup) -> Any:
    """Shapes, dtypes and shardings of the training state, to restore a checkpoint into."""
    sharding = replicate(setup.mesh)
    shapes = jax.eval_shape(setup.initial_state)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def eval_variables(state: steps.TrainState) -> tuple[Any, Any]:
    """The weights and batch statistics to evaluate: their moving averages when kept."""
    if state.ema_params:
        return state.ema_params, state.ema_model_state
    return state.params, state.model_state


def make_train_chunk_fn(setup: Setup, batch_size: int, steps_per_epoch: int):
    """The jitted, donating ``steps.train_chunk``:
    ``(state, order, images, labels, *, num_steps) -> (state, sums)``.

    One compilation per distinct ``num_steps``; on XLA:CPU it is compiled with the options
    that make training fast (YNNPACK off, see ``backend.py``).
    """
    return jax.jit(
        functools.partial(
            steps.train_chunk, settings=setup.settings, batch_size=batch_size, steps_per_epoch=steps_per_epoch
        ),
        static_argnames="num_steps",
        donate_argnums=0,
        compiler_options=backend.training_compiler_options(),
    )


def make_predict_fn(setup: Setup):
    """A function ``(params, model_state, images [N, 28, 28]) -> logits`` float32 ``[N, C]``
    (NumPy).

    The images are cut into batches of ``eval_batch_size`` on the host, the last one padded,
    and each batch is copied to the devices and goes through one jitted forward pass: one
    compilation serves every split (validation and test alike), and slicing and padding
    compile nothing. A Python loop rather than ``lax.map`` for the same reason as in
    ``steps.train_chunk``.
    """
    # Rounded up to a multiple of the devices: each device runs its shard of every batch.
    num_devices = setup.mesh.devices.size
    batch_size = -(-setup.config.eval_batch_size // num_devices) * num_devices

    def forward_batch(params, model_state, images):
        images = jax.lax.with_sharding_constraint(images, setup.settings.batch_sharding)
        return steps.predict_batch(params, model_state, images, setup.settings)

    forward = jax.jit(forward_batch, out_shardings=replicate(setup.mesh))

    def predict(params, model_state, images):
        images = to_host(images)
        n = images.shape[0]
        padded = np.pad(images, [(0, -n % batch_size)] + [(0, 0)] * (images.ndim - 1))
        logits = [
            forward(params, model_state, put_replicated(padded[i : i + batch_size], setup.mesh))
            for i in range(0, padded.shape[0], batch_size)
        ]
        return np.concatenate(to_host(logits))[:n]

    return predict


def evaluate_arrays(
    predict_fn, state: steps.TrainState, images: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics and logits ``[N, C]`` of ``state``'s evaluation weights on a dataset split."""
    logits = to_host(predict_fn(*eval_variables(state), images))
    return classification_metrics(logits, labels, num_classes), logits


def prepare_jax(config: Config) -> None:
    """Deterministic GPU kernels and the compilation cache, as ``config`` asks; call before
    JAX starts its backend (opening a run's checkpoints does)."""
    if config.deterministic:
        runtime.use_deterministic_ops()
    if config.compilation_cache:
        runtime.use_compilation_cache(config.cache_dir)


def train_and_evaluate(
    config: Config,
    workdir: str | Path,
    *,
    resume: bool = False,
    evaluate_test: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint if there is one).

    Args:
      config: the run's settings; checked by :func:`resolve_run` against the run being resumed.
      workdir: the run directory; created if needed.
      resume: require a checkpoint to resume from (an error if there is none).
      evaluate_test: False never loads the test set (its files are not even opened) and skips
        the final test evaluation: what a hyperparameter search needs.
      on_epoch: called with each epoch's record (``val_accuracy`` among its keys) after the
        epoch's checkpoint is saved; an exception it raises (e.g. a pruned trial) stops training.

    Returns:
      The final record: test loss and accuracy (None without ``evaluate_test``), best
      validation accuracy, wall time.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)
    prepare_jax(config)
    config = resolve_run(workdir, config, resume=resume)
    main = is_main_process()  # only process 0 writes files
    mesh = create_mesh(config.devices, config.batch_size)  # devices checked before any file is written
    # The data too: a damaged file, or a setting the dataset cannot meet, leaves no run directory.
    arrays = load_dataset(config, test=evaluate_test)
    config.check_against_data(len(arrays.train_images))
    # One writer per run directory: process 0 holds its lock until every file is closed.
    with DirectoryLock(workdir, TRAIN_LOCK, TRAIN_HOLDER) if main else contextlib.nullcontext():
        try:
            with (
                RunLogger(
                    workdir, enabled=main, progress=config.progress, tensorboard=config.tensorboard
                ) as logger,
                Checkpoints(workdir, config.keep) as checkpoints,
            ):
                return _train(
                    config, arrays, workdir, mesh, logger, checkpoints, main, t_start, evaluate_test, on_epoch
                )
        except Exception as e:
            failure = write_failure(e)
            if failure is None:
                raise
            raise write_error(workdir, *failure) from None


def _train(
    config: Config,
    arrays: Arrays,
    workdir: Path,
    mesh: jax.sharding.Mesh,
    logger: RunLogger,
    checkpoints: Checkpoints,
    main: bool,
    t_start: float,
    evaluate_test: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    # -- data: host arrays, then the training and validation split
    info = DATASETS[config.dataset]
    train_x, train_y, val_x, val_y = split_validation(
        arrays.train_images, arrays.train_labels, config.val_size, config.validation_seed
    )
    if config.train_size:
        train_x, train_y = train_x[: config.train_size], train_y[: config.train_size]
    steps_per_epoch = len(train_x) // config.batch_size
    total_steps = config.total_steps(steps_per_epoch)

    # -- model, optimizer, state; resume from the latest checkpoint when there is one
    setup = create_setup(config, steps_per_epoch, mesh)
    restored = checkpoints.restore(abstract_train_state(setup), warn=logger.print)
    meta: dict[str, Any] = {}
    if restored is None:
        state = create_train_state(setup)
    else:
        state, meta = restored
        logger.print(f"Resuming from step {meta['step']} (epoch {meta['epoch']}) in {workdir}")
    start_step = int(to_host(state.step))
    logger.truncate_after(start_step)
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(workdir / "config.json", config.to_json() + "\n")

    # -- the dataset goes to the device once, replicated; each device slices its own batches
    on_device = functools.partial(put_replicated, mesh=setup.mesh)
    train_images, train_labels = on_device(train_x), on_device(train_y.astype(np.int32))
    # Evaluation batches go to the device one at a time (see make_predict_fn).
    val_images = val_x

    train_chunk = make_train_chunk_fn(setup, config.batch_size, steps_per_epoch)
    order_fn = jax.jit(
        functools.partial(steps.epoch_order, num_examples=len(train_x)), out_shardings=replicate(setup.mesh)
    )
    predict_fn = make_predict_fn(setup)

    best_val_accuracy = meta.get("best_val_accuracy")
    # Sums of the steps since the last log point; a checkpoint between log points keeps them.
    log_sums = on_device(_sums_from_json(meta.get("log_sums") or _ZERO_SUMS))
    step, epoch_order, epoch_t0 = start_step, None, None
    chunks = plan_chunks(
        start_step,
        total_steps,
        steps_per_epoch,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        checkpoint_every_steps=config.checkpoint_every_steps,
    )
    with StopSignals(f"jax-mnist train --workdir {workdir} --resume") as stop:
        for chunk in chunks:
            position = chunk.start - chunk.epoch * steps_per_epoch
            # The last epoch is shorter when the run ends part way through it.
            epoch_steps = min(steps_per_epoch, total_steps - chunk.epoch * steps_per_epoch)
            if epoch_order is None or position == 0:
                epoch_order = order_fn(state.data_key, chunk.epoch)
            if position == 0:
                state = state.replace(epoch_sums=on_device(_sums_from_json(_ZERO_SUMS)))
            if epoch_t0 is None or position == 0:
                epoch_t0, epoch_train_time, epoch_start_position = time.perf_counter(), 0.0, position
                logger.start_epoch(
                    chunk.epoch + 1,
                    epochs=config.epochs,
                    steps=epoch_steps,
                    done=position,
                    batch_size=config.batch_size,
                )

            t0 = time.perf_counter()
            state, log_sums = run_steps(
                train_chunk,
                state,
                chunk.num_steps,
                config.steps_per_call,
                epoch_order,
                train_images,
                train_labels,
                sums=log_sums,
            )
            jax.block_until_ready(log_sums)  # waits for the chunk: the only sync inside an epoch
            epoch_train_time += time.perf_counter() - t0
            step = chunk.end
            if chunk.log:
                totals = to_host(log_sums)
                logger.log_step(
                    epoch=chunk.epoch + 1,
                    step=step,
                    loss=float(totals["loss"] / totals["count"]),
                    accuracy=float(totals["correct"] / totals["count"]),
                )
                log_sums = on_device(_sums_from_json(_ZERO_SUMS))

            record = None
            if chunk.epoch_end:
                record = _end_of_epoch(
                    state,
                    chunk.epoch + 1,
                    step,
                    setup,
                    predict_fn,
                    val_images,
                    val_y,
                    epoch_train_time,
                    (epoch_steps - epoch_start_position) * config.batch_size,
                )
                if record.get("val_accuracy") is not None:
                    best_val_accuracy = max(best_val_accuracy or 0.0, record["val_accuracy"])
                    record["best_val_accuracy"] = best_val_accuracy
                logger.log_epoch(record)

            # One reading of the signal decides both the save and the stop: a signal that lands
            # in between waits for the next chunk instead of stopping without a checkpoint.
            signum = agree_on_signal(stop.check())  # all processes stop at the same step
            if signum is not None:
                stop.acknowledge()  # stopping: the save below takes what it takes
            if chunk.checkpoint or signum is not None:
                meta = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "steps_per_epoch": steps_per_epoch,
                    "best_val_accuracy": best_val_accuracy,
                    "log_sums": None if chunk.log else _sums_to_json(to_host(log_sums)),
                }
                if record:
                    meta.update({k: v for k, v in record.items() if k.startswith(("val_", "train_"))})
                checkpoints.save(
                    state, meta, config, val_accuracy=record.get("val_accuracy") if record else None
                )
            if signum is not None:
                name = signal.Signals(signum).name
                raise TrainingInterrupted(
                    f"{name} at step {step} (epoch {step / steps_per_epoch:.2f}); saved a checkpoint "
                    f"in {checkpoints.root}. Resume with: jax-mnist train --workdir {workdir} --resume",
                    signum,
                )
            if record is not None and on_epoch is not None:
                on_epoch(record)

    if not evaluate_test:
        return {
            "step": step,
            "test_loss": None,
            "test_accuracy": None,
            "best_val_accuracy": best_val_accuracy,
            "wall_time_s": time.perf_counter() - t_start,
        }
    # -- the test set, once, at the end
    test_metrics, test_logits = evaluate_arrays(
        predict_fn, state, arrays.test_images, arrays.test_labels, info.num_classes
    )
    if main:
        # For reports: the test predictions, as plain arrays (np.load reads them without pickle).
        tmp = workdir / ".test_predictions.npz.tmp"  # replaced whole, as every file of a run
        with tmp.open("wb") as f:
            np.savez(f, logits=test_logits, labels=arrays.test_labels)
        os.replace(tmp, workdir / "test_predictions.npz")
    final = {
        "step": step,
        "test_loss": test_metrics["loss"],
        "test_accuracy": test_metrics["accuracy"],
        "best_val_accuracy": best_val_accuracy,
        "wall_time_s": time.perf_counter() - t_start,
    }
    logger.log_test(final)
    return final


_ZERO_SUMS = {"loss": 0.0, "correct": 0, "count": 0}


def _sums_to_json(sums: dict[str, np.ndarray]) -> dict[str, float | int]:
    # float32 -> Python float -> float32 is exact, so a resumed run logs the same numbers.
    return {"loss": float(sums["loss"]), "correct": int(sums["correct"]), "count": int(sums["count"])}


def _sums_from_json(values: dict[str, float | int]) -> dict[str, np.ndarray]:
    return {
        "loss": np.float32(values["loss"]),
        "correct": np.int32(values["correct"]),
        "count": np.int32(values["count"]),
    }


def run_steps(train_chunk, state, num_steps: int, steps_per_call: int, *data, sums=None):
    """Runs ``num_steps`` training steps as jitted calls of ``steps_per_call`` steps each.

    Args:
      train_chunk: the jitted chunk from :func:`make_train_chunk_fn`.
      state: the training state; donated to the first call.
      num_steps: steps to run; a remainder below ``steps_per_call`` runs as single steps.
      data: the device-resident training arrays the chunk slices its batches from.
      sums: running sums to add the steps' to (on the devices, like the state); zeros when
        None.

    Returns:
      ``(state, sums)``: the new state and ``sums`` plus the steps' summed ``loss``,
      ``correct`` and ``count``. Nothing here waits on the device: JAX queues the calls and
      this returns at once.
    """
    if sums is None:
        sums = _sums_from_json(_ZERO_SUMS)
    while num_steps > 0:
        n = steps_per_call if num_steps >= steps_per_call else 1
        state, sums = train_chunk(state, *data, sums=sums, num_steps=n)
        num_steps -= n
    return state, sums


def _end_of_epoch(
    state, epoch, step, setup, predict_fn, val_images, val_labels, train_time, images_trained
) -> dict[str, Any]:
    sums = to_host(state.epoch_sums)
    record = {
        "epoch": epoch,
        "step": step,
        "train_loss": float(sums["loss"] / sums["count"]),
        "train_accuracy": float(sums["correct"] / sums["count"]),
        "epoch_time_s": train_time,
        "images_per_s": images_trained / max(train_time, 1e-9),
    }
    if len(val_labels):
        metrics, _ = evaluate_arrays(predict_fn, state, val_images, val_labels, setup.info.num_classes)
        record.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
    return record
