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
import signal
import time
from collections.abc import Callable, Iterator
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
from jax_mnist.inference import make_batched_evaluate, make_batched_predict
from jax_mnist.logs import RunLogger
from jax_mnist.models import MODELS, compute_dtype, model_from_config, split_variables
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
from jax_mnist.rundir import TRAIN_HOLDER, TRAIN_LOCK, DirectoryLock, save_npz_atomically, write_atomically
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
    compiled for speed of compiling (:func:`~jax_mnist.backend.compiler_options` ``"init"``)."""
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
    that make training fast (:func:`~jax_mnist.backend.compiler_options` ``"train"``: reductions
    and single dots in YNNPACK, convolutions in Eigen; element-wise fusions too for the models
    whose registry entry says so, ``cpu_training_fusions``).
    """
    return jax.jit(
        functools.partial(
            steps.train_chunk, settings=setup.settings, batch_size=batch_size, steps_per_epoch=steps_per_epoch
        ),
        static_argnames="num_steps",
        donate_argnums=0,
        compiler_options=backend.compiler_options("train", MODELS[setup.config.model].cpu_training_fusions),
    )


def make_predict_fn(setup: Setup) -> Callable[[Variables, np.ndarray], np.ndarray]:
    """``(variables, images [N, 28, 28]) -> logits`` float32 ``[N, C]`` (NumPy): the run's
    model through :func:`~jax_mnist.inference.make_batched_predict`, sharded over its mesh in
    batches of ``eval_batch_size``, the last padded to a full one."""
    predict = make_batched_predict(
        functools.partial(steps.apply_variables, settings=setup.settings),
        setup.mesh,
        setup.info.num_classes,
        one_shape=True,
    )
    return functools.partial(predict, batch_size=setup.config.eval_batch_size)


def make_evaluate_fn(setup: Setup) -> Callable[..., tuple[np.ndarray, dict[str, float]]]:
    """``(variables, images [N, 28, 28], labels [N]) -> (logits, metrics)``: the run's model
    through :func:`~jax_mnist.inference.make_batched_evaluate` (the loss of
    :func:`~jax_mnist.steps.eval_step`, summed on the devices), sharded over its mesh in
    batches of ``eval_batch_size``, the last padded to a full one: one compiled shape serves
    the validation split every epoch and the test set at the end."""
    evaluate = make_batched_evaluate(
        functools.partial(steps.apply_variables, settings=setup.settings),
        setup.mesh,
        setup.info.num_classes,
        one_shape=True,
    )
    return functools.partial(evaluate, batch_size=setup.config.eval_batch_size)


def evaluate_arrays(
    evaluate_fn, state: steps.TrainState, images: np.ndarray, labels: np.ndarray, config: Config
) -> tuple[dict[str, Any], np.ndarray]:
    """Mean loss and accuracy, and logits ``[N, C]``, of ``state``'s evaluation weights on a
    dataset split (``evaluate_fn`` from :func:`make_evaluate_fn`)."""
    logits, metrics = evaluate_fn(steps.eval_variables(state, config.ema_decay), images, labels)
    return metrics, logits


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
      evaluate_test: False skips the test set (its files are not even opened), as a search does.
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
    mesh = create_mesh(config.devices, config.batch_size)  # devices checked before any file is written
    # The data too: a damaged file, or a setting the dataset cannot meet, leaves no run directory.
    arrays = load_dataset(config, test=evaluate_test)
    config.check_against_data(len(arrays.train_images))
    with _run_files(workdir, config) as (logger, checkpoints):
        run = _start_run(config, arrays, workdir, mesh, logger=logger, checkpoints=checkpoints)
        state, step, best_val_accuracy, log_sums = _restore_or_create_state(run)
        # The epoch's order and arrays, the seconds spent in its chunks, the step this process began at.
        data, epoch_time, epoch_start = None, 0.0, 0
        with StopSignals(f"jax-mnist train --workdir {workdir} --resume") as stop:
            for chunk in plan_chunks(step, run.total_steps, run.steps_per_epoch, **_cadences(config)):
                if data is None or chunk.position == 0:  # an epoch begins, or goes on after a resume
                    data = (run.epoch_order(state.data_key, chunk.epoch), *run.train_data)
                    if chunk.position == 0:
                        state = state.replace(epoch_sums=put_replicated(steps.zero_sums(), mesh))
                    epoch_time, epoch_start = 0.0, chunk.position
                    logger.start_epoch(
                        chunk.epoch + 1,
                        epochs=config.epochs,
                        steps=chunk.epoch_steps,
                        done=epoch_start,
                        batch_size=config.batch_size,
                    )
                t0 = time.perf_counter()
                state, log_sums = run_steps(
                    run.train_chunk, state, chunk.num_steps, config.steps_per_call, *data, sums=log_sums
                )
                jax.block_until_ready(log_sums)  # waits for the chunk: the only sync inside an epoch
                epoch_time += time.perf_counter() - t0
                step = chunk.end
                if chunk.log:
                    logger.log_step(epoch=chunk.epoch + 1, step=step, **steps.mean_metrics(to_host(log_sums)))
                    log_sums = put_replicated(steps.zero_sums(), mesh)
                record = None
                if chunk.epoch_end:
                    val = _validate(run, state)  # None without a validation split
                    if val is not None:
                        best_val_accuracy = max(best_val_accuracy or 0.0, val["accuracy"])
                    record = _epoch_record(run, state, chunk, epoch_time, epoch_start, val, best_val_accuracy)
                    logger.log_epoch(record)
                # One reading of the signal decides both the save and the stop: a signal that lands
                # in between waits for the next chunk instead of stopping without a checkpoint.
                signum = agree_on_signal(stop.check())  # all processes stop at the same step
                if signum is not None:
                    stop.acknowledge()  # stopping: the save below takes what it takes
                if chunk.checkpoint or signum is not None:
                    meta = _checkpoint_meta(run, step, best_val_accuracy, record, log_sums, logged=chunk.log)
                    checkpoints.save(state, meta, config, val_accuracy=(record or {}).get("val_accuracy"))
                if signum is not None:
                    raise _interrupted(run, step, signum)
                if record is not None and on_epoch is not None:
                    on_epoch(record)
        test = _evaluate_test(run, state, arrays) if evaluate_test else None
        return _final_record(run, step, test, best_val_accuracy, time.perf_counter() - t_start)


@contextlib.contextmanager
def _run_files(workdir: Path, config: Config) -> Iterator[tuple[RunLogger, Checkpoints]]:
    """The run directory's logger and checkpoints, open while training; process 0 alone writes
    files, and holds the directory's lock until every file is closed. A write the file system
    refuses (a full disk, a read-only directory) becomes one line naming the file."""
    main = is_main_process()
    with DirectoryLock(workdir, TRAIN_LOCK, TRAIN_HOLDER) if main else contextlib.nullcontext():
        try:
            with (
                RunLogger(
                    workdir, enabled=main, progress=config.progress, tensorboard=config.tensorboard
                ) as logger,
                Checkpoints(workdir, config.keep) as checkpoints,
            ):
                yield logger, checkpoints
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
    evaluate: Callable[..., tuple[np.ndarray, dict[str, float]]]  # (variables, images, labels)


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
        evaluate=make_evaluate_fn(setup),
    )


def _restore_or_create_state(run: _Run) -> tuple[steps.TrainState, int, float | None, Sums]:
    """The latest checkpoint's state when there is one, else a fresh start; writes the run's
    ``config.json`` and drops the log records of steps after it.

    Returns ``(state, step, best_val_accuracy, log_sums)``: the sums, on the devices, of the
    steps since the last log line (a checkpoint between two log points keeps them).
    """
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
    log_sums = steps.sums_from_json(meta["log_sums"]) if meta.get("log_sums") else steps.zero_sums()
    return state, step, meta.get("best_val_accuracy"), put_replicated(log_sums, run.setup.mesh)


def _cadences(config: Config) -> dict[str, int]:
    """When ``config`` logs and saves, as :func:`plan_chunks` takes it."""
    return {
        "log_every": config.log_every,
        "checkpoint_every": config.checkpoint_every,
        "checkpoint_every_steps": config.checkpoint_every_steps,
    }


def _epoch_record(
    run: _Run,
    state: steps.TrainState,
    chunk: Chunk,
    train_time: float,
    epoch_start: int,
    val: dict[str, Any] | None,
    best_val_accuracy: float | None,
) -> dict[str, Any]:
    """The record of the epoch ``chunk`` ends: its training loss and accuracy, its speed over
    the steps this process ran (from ``epoch_start``) in ``train_time`` seconds, and the
    validation metrics ``val`` (None without a validation split)."""
    images_trained = (chunk.epoch_steps - epoch_start) * run.config.batch_size
    record: dict[str, Any] = {
        "epoch": chunk.epoch + 1,
        "step": chunk.end,
        **{f"train_{k}": v for k, v in steps.mean_metrics(to_host(state.epoch_sums)).items()},
        "epoch_time_s": train_time,
        "images_per_s": images_trained / max(train_time, 1e-9),
    }
    if val is not None:
        record.update(val_loss=val["loss"], val_accuracy=val["accuracy"], best_val_accuracy=best_val_accuracy)
    return record


def _validate(run: _Run, state: steps.TrainState) -> dict[str, Any] | None:
    """Metrics of ``state`` on the validation split; None when the run holds none out."""
    images, labels = run.val_data
    return evaluate_arrays(run.evaluate, state, images, labels, run.config)[0] if len(labels) else None


def _final_record(
    run: _Run, step: int, test: dict[str, Any] | None, best_val_accuracy: float | None, wall_time: float
) -> dict[str, Any]:
    """What :func:`train_and_evaluate` returns; logged as the test record when ``test`` has
    the test metrics (None when the run skipped the test set)."""
    final = {
        "step": step,
        "test_loss": test and test["loss"],
        "test_accuracy": test and test["accuracy"],
        "best_val_accuracy": best_val_accuracy,
        "wall_time_s": wall_time,
    }
    if test is not None:
        run.logger.log_test(final)
    return final


def _checkpoint_meta(
    run: _Run,
    step: int,
    best_val_accuracy: float | None,
    record: dict[str, Any] | None,
    log_sums: Sums,
    *,
    logged: bool,
) -> dict[str, Any]:
    """What a checkpoint records beside the state for a resume: the step, the best validation
    accuracy, the sums of the steps since the last log line (None right after one), and the
    epoch's metrics when it ends one."""
    meta = {
        "step": step,
        "epoch": step / run.steps_per_epoch,
        "steps_per_epoch": run.steps_per_epoch,
        "best_val_accuracy": best_val_accuracy,
        "log_sums": None if logged else steps.sums_to_json(to_host(log_sums)),
    }
    if record:
        meta.update({k: v for k, v in record.items() if k.startswith(("val_", "train_"))})
    return meta


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
    metrics, logits = evaluate_arrays(run.evaluate, state, images, labels, run.config)
    if run.main:
        save_npz_atomically(run.workdir / "test_predictions.npz", logits=logits, labels=labels)
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
