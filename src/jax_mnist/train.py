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
from jax_mnist.inference import make_batched_predict
from jax_mnist.logs import RunLogger
from jax_mnist.metrics import classification_metrics
from jax_mnist.models import compute_dtype, model_from_config, split_variables
from jax_mnist.optim import create_optimizer
from jax_mnist.parallel import (
    agree_on_signal,
    create_mesh,
    is_main_process,
    put_replicated,
    replicate,
    to_host,
)
from jax_mnist.plan import Chunk, plan_chunks
from jax_mnist.resume import resolve_run
from jax_mnist.rundir import TRAIN_HOLDER, TRAIN_LOCK, DirectoryLock, write_atomically
from jax_mnist.signals import StopSignals
from jax_mnist.steps import Sums, Variables


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
    dtype = compute_dtype(config.dtype)
    tx = create_optimizer(config, steps_per_epoch)
    make_model = model_from_config(config, info.num_classes)

    graphdef, _, _ = split_variables(nnx.eval_shape(make_model))
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
        _, param_vars, other_vars = split_variables(make_model())
        params, model_state = nnx.to_pure_dict(param_vars), nnx.to_pure_dict(other_vars)
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
        compiler_options=backend.compiler_options("init"),
    )()


def abstract_train_state(setup: Setup) -> Any:
    """Shapes, dtypes and shardings of the training state, to restore a checkpoint into."""
    sharding = replicate(setup.mesh)
    shapes = jax.eval_shape(setup.initial_state)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


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
        compiler_options=backend.compiler_options("train"),
    )


def make_predict_fn(setup: Setup) -> Callable[[Variables, np.ndarray], np.ndarray]:
    """``(variables, images [N, 28, 28]) -> logits`` float32 ``[N, C]`` (NumPy): the run's
    model through :func:`~jax_mnist.inference.make_batched_predict`, sharded over its mesh in
    batches of ``eval_batch_size``, the last padded to a full one: one compiled shape serves the
    validation split every epoch and the test set at the end."""
    predict = make_batched_predict(
        functools.partial(steps.apply_variables, settings=setup.settings),
        setup.mesh,
        setup.info.num_classes,
        one_shape=True,
    )
    return functools.partial(predict, batch_size=setup.config.eval_batch_size)


def evaluate_arrays(
    predict_fn, state: steps.TrainState, images: np.ndarray, labels: np.ndarray, config: Config
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics and logits ``[N, C]`` of ``state``'s evaluation weights on a dataset split."""
    logits = predict_fn(steps.eval_variables(state, config.ema_decay), images)
    return classification_metrics(logits, labels, DATASETS[config.dataset].num_classes), logits


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
                run = _start_run(config, arrays, workdir, mesh, logger=logger, checkpoints=checkpoints)
                state, progress = _restore_or_create_state(run)
                state = _train_loop(run, state, progress, on_epoch)
                test = _evaluate_test(run, state, arrays) if evaluate_test else {}
                final = {
                    "step": progress.step,
                    "test_loss": test.get("loss"),
                    "test_accuracy": test.get("accuracy"),
                    "best_val_accuracy": progress.best_val_accuracy,
                    "wall_time_s": time.perf_counter() - t_start,
                }
                if evaluate_test:
                    logger.log_test(final)
                return final
        except Exception as e:
            failure = write_failure(e)
            if failure is None:
                raise
            raise write_error(workdir, *failure) from None


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the loop works with, fixed for the whole run: settings, files, data, functions."""

    config: Config
    workdir: Path
    setup: Setup
    logger: RunLogger
    checkpoints: Checkpoints
    main: bool  # process 0, which writes the files
    steps_per_epoch: int
    total_steps: int
    train_data: tuple[jax.Array, jax.Array]  # images [N, 28, 28] uint8, labels [N] int32; replicated
    val_data: tuple[np.ndarray, np.ndarray]  # on the host: evaluation copies them batch by batch
    train_chunk: Callable[..., tuple[steps.TrainState, Sums]]
    epoch_order: Callable[[jax.Array, int], jax.Array]
    predict: Callable[[Variables, np.ndarray], np.ndarray]


@dataclasses.dataclass
class _Progress:
    """The loop's bookkeeping between chunks: where it is, and what the epoch has cost."""

    step: int
    best_val_accuracy: float | None
    log_sums: Sums  # on the devices: sums of the steps since the last log line
    epoch_order: jax.Array | None = None  # this epoch's permutation of the training set
    epoch_train_time: float = 0.0  # seconds this process spent in the epoch's chunks
    epoch_first_position: int | None = None  # the step of the epoch this process began at


def _start_run(
    config: Config,
    arrays: Arrays,
    workdir: Path,
    mesh: jax.sharding.Mesh,
    *,
    logger: RunLogger,
    checkpoints: Checkpoints,
) -> _Run:
    """Splits the data, builds the model and compiles nothing yet: the run's fixed parts."""
    train_x, train_y, val_x, val_y = split_validation(
        arrays.train_images, arrays.train_labels, config.val_size, config.validation_seed
    )
    if config.train_size:
        train_x, train_y = train_x[: config.train_size], train_y[: config.train_size]
    steps_per_epoch = len(train_x) // config.batch_size
    setup = create_setup(config, steps_per_epoch, mesh)
    return _Run(
        config=config,
        workdir=workdir,
        setup=setup,
        logger=logger,
        checkpoints=checkpoints,
        main=is_main_process(),
        steps_per_epoch=steps_per_epoch,
        total_steps=config.total_steps(steps_per_epoch),
        # The training set goes to the device once, replicated; each device slices its batches.
        train_data=put_replicated((train_x, train_y.astype(np.int32)), mesh),
        val_data=(val_x, val_y),
        train_chunk=make_train_chunk_fn(setup, config.batch_size, steps_per_epoch),
        epoch_order=jax.jit(
            functools.partial(steps.epoch_order, num_examples=len(train_x)), out_shardings=replicate(mesh)
        ),
        predict=make_predict_fn(setup),
    )


def _restore_or_create_state(run: _Run) -> tuple[steps.TrainState, _Progress]:
    """The latest checkpoint's state and bookkeeping when there is one, else a fresh start;
    writes the run's ``config.json``."""
    restored = run.checkpoints.restore(abstract_train_state(run.setup), warn=run.logger.print)
    meta: dict[str, Any] = {}
    if restored is None:
        state = create_train_state(run.setup)
    else:
        state, meta = restored
        run.logger.print(f"Resuming from step {meta['step']} (epoch {meta['epoch']}) in {run.workdir}")
    step = int(to_host(state.step))
    run.logger.truncate_after(step)
    if run.main:
        run.workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(run.workdir / "config.json", run.config.to_json() + "\n")
    # A checkpoint between two log points keeps the sums of the steps since the first.
    log_sums = steps.sums_from_json(meta["log_sums"]) if meta.get("log_sums") else steps.zero_sums()
    progress = _Progress(step, meta.get("best_val_accuracy"), put_replicated(log_sums, run.setup.mesh))
    return state, progress


def _train_loop(
    run: _Run,
    state: steps.TrainState,
    progress: _Progress,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> steps.TrainState:
    """Runs the planned chunks from ``progress.step`` to the end of training; between chunks,
    logs, evaluates at epoch ends, saves checkpoints and stops on a signal."""
    config = run.config
    chunks = plan_chunks(
        progress.step,
        run.total_steps,
        run.steps_per_epoch,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        checkpoint_every_steps=config.checkpoint_every_steps,
    )
    with StopSignals(f"jax-mnist train --workdir {run.workdir} --resume") as stop:
        for chunk in chunks:
            state = _begin_chunk(run, state, progress, chunk)
            t0 = time.perf_counter()
            state, progress.log_sums = run_steps(
                run.train_chunk,
                state,
                chunk.num_steps,
                config.steps_per_call,
                progress.epoch_order,
                *run.train_data,
                sums=progress.log_sums,
            )
            jax.block_until_ready(progress.log_sums)  # waits for the chunk: the only sync inside an epoch
            progress.epoch_train_time += time.perf_counter() - t0
            progress.step = chunk.end
            if chunk.log:
                _log_step(run, progress, epoch=chunk.epoch + 1)
            record = _end_of_epoch(run, state, progress, epoch=chunk.epoch + 1) if chunk.epoch_end else None
            # One reading of the signal decides both the save and the stop: a signal that lands
            # in between waits for the next chunk instead of stopping without a checkpoint.
            signum = agree_on_signal(stop.check())  # all processes stop at the same step
            if signum is not None:
                stop.acknowledge()  # stopping: the save below takes what it takes
            if chunk.checkpoint or signum is not None:
                _save(run, state, progress, record, logged=chunk.log)
            if signum is not None:
                raise _interrupted(run, progress.step, signum)
            if record is not None and on_epoch is not None:
                on_epoch(record)
    return state


def _begin_chunk(run: _Run, state: steps.TrainState, progress: _Progress, chunk: Chunk) -> steps.TrainState:
    """At an epoch's first chunk (or the first after a resume): its data order, zeroed epoch
    sums, its clock and its progress line."""
    position = chunk.start - chunk.epoch * run.steps_per_epoch
    if progress.epoch_order is None or position == 0:
        progress.epoch_order = run.epoch_order(state.data_key, chunk.epoch)
    if position == 0:
        state = state.replace(epoch_sums=put_replicated(steps.zero_sums(), run.setup.mesh))
    if progress.epoch_first_position is None or position == 0:
        progress.epoch_train_time, progress.epoch_first_position = 0.0, position
        run.logger.start_epoch(
            chunk.epoch + 1,
            epochs=run.config.epochs,
            steps=_epoch_steps(run, chunk.epoch),
            done=position,
            batch_size=run.config.batch_size,
        )
    return state


def _epoch_steps(run: _Run, epoch: int) -> int:
    """Steps in ``epoch`` (0-based): the last is shorter when the run ends part way through it."""
    return min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)


def _log_step(run: _Run, progress: _Progress, *, epoch: int) -> None:
    totals = to_host(progress.log_sums)
    run.logger.log_step(
        epoch=epoch,
        step=progress.step,
        loss=float(totals["loss"] / totals["count"]),
        accuracy=float(totals["correct"] / totals["count"]),
    )
    progress.log_sums = put_replicated(steps.zero_sums(), run.setup.mesh)


def _end_of_epoch(run: _Run, state: steps.TrainState, progress: _Progress, *, epoch: int) -> dict[str, Any]:
    """The epoch's record (training and validation metrics, speed), logged."""
    sums = to_host(state.epoch_sums)
    images_trained = (
        _epoch_steps(run, epoch - 1) - (progress.epoch_first_position or 0)
    ) * run.config.batch_size
    train_time = progress.epoch_train_time
    record: dict[str, Any] = {
        "epoch": epoch,
        "step": progress.step,
        "train_loss": float(sums["loss"] / sums["count"]),
        "train_accuracy": float(sums["correct"] / sums["count"]),
        "epoch_time_s": train_time,
        "images_per_s": images_trained / max(train_time, 1e-9),
    }
    val_images, val_labels = run.val_data
    if len(val_labels):
        metrics, _ = evaluate_arrays(run.predict, state, val_images, val_labels, run.config)
        progress.best_val_accuracy = max(progress.best_val_accuracy or 0.0, metrics["accuracy"])
        record.update(
            val_loss=metrics["loss"],
            val_accuracy=metrics["accuracy"],
            best_val_accuracy=progress.best_val_accuracy,
        )
    run.logger.log_epoch(record)
    return record


def _save(
    run: _Run, state: steps.TrainState, progress: _Progress, record: dict[str, Any] | None, *, logged: bool
) -> None:
    """Saves a checkpoint with what a resume needs: the step, the best validation accuracy,
    and the sums of the steps since the last log line (none right after one)."""
    meta = {
        "step": progress.step,
        "epoch": progress.step / run.steps_per_epoch,
        "steps_per_epoch": run.steps_per_epoch,
        "best_val_accuracy": progress.best_val_accuracy,
        "log_sums": None if logged else steps.sums_to_json(to_host(progress.log_sums)),
    }
    if record:
        meta.update({k: v for k, v in record.items() if k.startswith(("val_", "train_"))})
    val_accuracy = record.get("val_accuracy") if record else None
    run.checkpoints.save(state, meta, run.config, val_accuracy=val_accuracy)


def _interrupted(run: _Run, step: int, signum: int) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    return TrainingInterrupted(
        f"{name} at step {step} (epoch {step / run.steps_per_epoch:.2f}); saved a checkpoint "
        f"in {run.checkpoints.root}. Resume with: jax-mnist train --workdir {run.workdir} --resume",
        signum,
    )


def _evaluate_test(run: _Run, state: steps.TrainState, arrays: Arrays) -> dict[str, Any]:
    """Test metrics, once, at the end; process 0 keeps the predictions for reports."""
    images, labels = arrays.test_split()
    metrics, logits = evaluate_arrays(run.predict, state, images, labels, run.config)
    if run.main:
        # Plain arrays (np.load reads them without pickle), replaced whole as every file of a run.
        tmp = run.workdir / ".test_predictions.npz.tmp"
        with tmp.open("wb") as f:
            np.savez(f, logits=logits, labels=labels)
        os.replace(tmp, run.workdir / "test_predictions.npz")
    return metrics


def run_steps(train_chunk, state, num_steps: int, steps_per_call: int, *data, sums=None):
    """Runs ``num_steps`` training steps as jitted calls of ``steps_per_call`` steps each (a
    remainder as single steps) of ``train_chunk`` (:func:`make_train_chunk_fn`) on ``data``,
    the device-resident training arrays. ``state`` is donated; ``sums`` (zeros when None) are
    running sums to add the steps' ``loss``, ``correct`` and ``count`` to.

    Returns ``(state, sums)`` without waiting: JAX queues the calls and this returns at once.
    """
    if sums is None:
        sums = steps.zero_sums()
    while num_steps > 0:
        n = steps_per_call if num_steps >= steps_per_call else 1
        state, sums = train_chunk(state, *data, sums=sums, num_steps=n)
        num_steps -= n
    return state, sums
