"""Checkpoints with Orbax: the latest few and the best by validation accuracy.

Layout of a run directory::

    config.json              the resolved config of the run
    metrics.jsonl            one JSON record per log point, epoch and test evaluation
    checkpoints/latest/<step>/{state,meta,config}   the last --keep checkpoints
    checkpoints/best/<step>/{state,meta,config}     the one with the best validation accuracy

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a save
cut short is never taken for a checkpoint. Restoring tells two failures apart:

- a checkpoint that is *damaged* after the fact (a file truncated or deleted) fails to read;
  :meth:`Checkpoints.restore` says so and falls back to the next older one. When the run is
  open for writing (training), the damaged checkpoint is moved to ``checkpoints/damaged/``
  (and the move is reported), so that training saves that step anew instead of finding it
  taken;
- a checkpoint that *does not fit* (its arrays have other names or shapes than the model the
  config describes: another model definition or package version) is intact, so nothing is
  moved and no older checkpoint is tried: the error names the first difference.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_mnist.backend import (
    keep_silencing_reads_left_in_flight,
    keeping_filters_on_failure,
    silence_reads_left_in_flight,
)
from jax_mnist.config import Config
from jax_mnist.errors import UserError, WriteError

# What Orbax calls a checkpoint it is still writing (``64.orbax-checkpoint-tmp``, in older
# versions with a timestamp after it): renamed to its step when complete.
UNFINISHED = "*.orbax-checkpoint-tmp*"

# What reading a damaged checkpoint raises, on every JAX and Orbax this package supports:
# TensorStore's errors are ValueErrors (a data file truncated or altered, the OCDBT manifest
# gone: "OUT_OF_RANGE: ...", "NOT_FOUND: ..."), a file deleted is a FileNotFoundError (or
# another OSError as the disk fails), Orbax's JSON files that do not parse are
# json.JSONDecodeErrors (ValueErrors too). Anything else (out of memory, a sharding bug) is not
# taken for damage: it propagates and the checkpoint stays where it is.
DAMAGE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError)
# Reading the config item: a checkpoint without one raises KeyError too.
_CONFIG_ERRORS: tuple[type[Exception], ...] = (*DAMAGE_ERRORS, KeyError)


class CheckpointMismatch(UserError):
    """An intact checkpoint whose arrays do not fit the model the config describes."""


def _manager(
    directory: Path, keep: int, *, best: bool, read_only: bool, async_save: bool
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda metrics: metrics["val_accuracy"]) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        # Asynchronous: save() returns once the arrays are copied to host memory (Orbax does
        # that before returning, so the next step may donate the device buffers) and the files
        # are written by a background thread while training goes on. Checkpoints.close()
        # waits for them, so a save is on disk before the process exits, on Ctrl-C too.
        enable_async_checkpointing=async_save,
        # With several processes, both managers may save the same step at once: their
        # barriers need names of their own (Orbax names them by step alone).
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix="best" if best else "latest"
        ),
    )
    return ocp.CheckpointManager(
        directory.absolute(), options=options, item_names=("state", "meta", "config")
    )


class Checkpoints:
    """The checkpoints of one run directory.

    Args:
      workdir: the run directory.
      keep: how many of the latest checkpoints to keep.
      read_only: open for restoring only (evaluate, predict).
      async_save: write checkpoints in the background (see :meth:`save`).
    """

    def __init__(self, workdir: Path, keep: int = 3, *, read_only: bool = False, async_save: bool = True):
        self.root = Path(workdir) / "checkpoints"
        self.read_only = read_only
        if read_only and not self.root.is_dir():
            raise UserError(
                f"{workdir}: no checkpoints here; train with `jax-mnist train --workdir {workdir}` first"
            )
        async_save = async_save and not read_only
        # Undone by close(): the filters of silence_reads_left_in_flight, from the start when
        # writing (a save that fails, on a full disk, leaves TensorStore writes in flight as
        # Orbax gives up), from the first restore otherwise.
        self._filters = contextlib.ExitStack()
        self._filtering = False
        if not read_only:
            self._filter_stray_reads()
        self.latest = _manager(
            self.root / "latest", keep, best=False, read_only=read_only, async_save=async_save
        )
        self.best = _manager(self.root / "best", 1, best=True, read_only=read_only, async_save=async_save)

    def save(
        self, state: Any, meta: dict[str, Any], config: Config, *, val_accuracy: float | None = None
    ) -> None:
        """Saves ``state`` as the latest checkpoint, and as the best when it is.

        With ``async_save`` this returns once the arrays are copied to host memory; the files
        are written in the background (a checkpoint appears under its step only when
        complete). The next save, :meth:`wait` and :meth:`close` wait for them.

        Args:
          state: the training state pytree.
          meta: JSON-able facts about the checkpoint (step, epoch, metrics).
          val_accuracy: when given, the checkpoint also competes for best.
        """
        step = int(meta["step"])
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(config.to_dict()),
        )
        with keeping_filters_on_failure():
            if step not in self.latest.all_steps():
                self.latest.save(step, args=args, force=True)
            if val_accuracy is not None and step not in self.best.all_steps():
                self.best.save(step, args=args, metrics={"val_accuracy": val_accuracy}, force=True)

    def wait(self) -> None:
        """Waits until every checkpoint saved so far is complete on disk."""
        with keeping_filters_on_failure():
            try:
                self.latest.wait_until_finished()
            finally:
                self.best.wait_until_finished()

    def steps(self, kind: str = "latest") -> list[int]:
        return sorted(self._manager(kind).all_steps())

    def _manager(self, kind: str) -> ocp.CheckpointManager:
        return self.best if kind == "best" else self.latest

    def _candidates(self, which: str | int) -> tuple[ocp.CheckpointManager, list[int]]:
        if isinstance(which, int) or str(which).isdigit():
            step = int(which)
            for manager in (self.latest, self.best):
                if step in manager.all_steps():
                    return manager, [step]
            raise UserError(
                f"{self.root}: no checkpoint at step {step}; there are "
                f"{sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))}"
            )
        if which == "best":
            best = self.best.best_step()
            if best is not None:
                return self.best, [best]
            which = "latest"  # trained without a validation split: the latest is the best we have
        return self.latest, sorted(self.latest.all_steps(), reverse=True)

    def read_config(self, which: str | int = "latest") -> Config:
        """The config stored with a checkpoint (the first readable one, newest first)."""
        manager, steps = self._candidates(which)
        for step in steps:
            # The config item alone, through Orbax (about 15 ms a checkpoint on a CPU, where
            # reading its file directly took 0.3 ms: nothing beside loading a model).
            try:
                stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            except _CONFIG_ERRORS:
                continue
            return Config.from_dict(dict(stored), source=str(Path(manager.directory) / str(step) / "config"))
        raise UserError(f"{self.root}: no readable checkpoint; train again or pass another run directory")

    def restore(
        self, abstract_state: Any, which: str | int = "latest", *, partial: bool = False, warn=print
    ) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest intact checkpoint of ``which`` (``latest``, ``best`` or a step).

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with shardings) to restore into.
          partial: restore only the entries of ``abstract_state`` (a dict naming some of the
            training state's fields, e.g. the weights without the optimizer state).
          warn: called with a one-line message for each damaged checkpoint skipped.

        Returns:
          ``(state, meta)``, or None when there is no checkpoint at all.

        Raises:
          CheckpointMismatch: a checkpoint is intact but holds other arrays than
            ``abstract_state`` (checked before anything is read).
          UserError: every checkpoint there is damaged.
        """
        self.wait()  # nothing is moved aside, or read, while it is being written
        manager, steps = self._candidates(which)
        if not steps:
            return None
        kind = "best" if manager is self.best else "latest"
        # Before the first read: a damaged file can fail a read while others are in flight.
        self._filter_stray_reads()
        for step in steps:
            state_dir = Path(manager.directory) / str(step) / "state"
            # The handler rather than a Checkpointer, whose metadata() turns the errors of a
            # damaged checkpoint into no metadata, without saying which.
            handler = ocp.PyTreeCheckpointHandler()
            try:
                stored = handler.metadata(state_dir).tree
                problem = None
            except DAMAGE_ERRORS as e:
                stored, problem = None, f"its array metadata cannot be read: {_first_line(e)}"
            finally:
                handler.close()
            if stored is not None:
                difference = tree_difference(stored, abstract_state, partial=partial)
                if difference:
                    raise CheckpointMismatch(
                        f"{state_dir.parent}: the checkpoint does not fit the model its config "
                        f"describes ({difference}); it was written by another version of the model "
                        "code or of jax-mnist: restore it with that version, or train into a new --workdir"
                    )
                restore_args = (
                    ocp.args.PyTreeRestore(
                        abstract_state,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                        partial_restore=True,
                    )
                    if partial
                    else ocp.args.StandardRestore(abstract_state)
                )
                try:
                    restored = manager.restore(
                        step, args=ocp.args.Composite(state=restore_args, meta=ocp.args.JsonRestore())
                    )
                    jax.block_until_ready(restored.state)
                    return restored.state, dict(restored.meta)
                except DAMAGE_ERRORS as e:
                    problem = _first_line(e)
            # Orbax gave up on this checkpoint with reads still in flight, which end (or are
            # collected) at any later time, up to the process's exit.
            keep_silencing_reads_left_in_flight()
            warn(f"warning: checkpoint {state_dir.parent} is damaged ({problem}); trying an older one")
            if not self.read_only:
                self._quarantine(manager, kind, step, warn)
        advice = (
            "the damaged ones were moved to " + str(self.root / "damaged")
            if not self.read_only
            else "`jax-mnist train --workdir` on this run moves them aside"
        )
        raise UserError(f"{manager.directory}: every checkpoint is damaged ({advice})")

    def _quarantine(self, manager: ocp.CheckpointManager, kind: str, step: int, warn) -> None:
        """Moves a damaged checkpoint out of the manager's sight, so its step can be saved anew."""
        source = Path(manager.directory) / str(step)
        target = self.root / "damaged" / f"{kind}-{step}"
        n = 1
        while target.exists():
            n += 1
            target = self.root / "damaged" / f"{kind}-{step}.{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        manager.reload()
        warn(f"warning: moved the damaged checkpoint {source} to {target}")

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _filter_stray_reads(self) -> None:
        """Enters :func:`silence_reads_left_in_flight` until close(), once."""
        if not self._filtering:
            self._filters.enter_context(silence_reads_left_in_flight())
            self._filtering = True

    def close(self) -> None:
        """Waits for the saves in progress to be complete on disk, then closes.

        The process's exception hooks are given back as they were before this object filtered
        them (see :func:`silence_reads_left_in_flight`).
        """
        try:
            self.wait()
        finally:
            try:
                self.latest.close()
            finally:
                try:
                    self.best.close()
                finally:
                    self._filtering = False
                    self._filters.close()


def complete_steps(workdir: Path) -> list[int]:
    """The steps of a run directory's complete latest checkpoints (what training resumes from)."""
    return sorted(
        int(d.name) for d in _subfolders(Path(workdir) / "checkpoints" / "latest") if d.name.isdigit()
    )


def remove_unfinished(workdir: Path) -> list[Path]:
    """Removes the checkpoints a failed save or a crash left half-written; returns them."""
    unfinished = sorted((Path(workdir) / "checkpoints").glob(f"*/{UNFINISHED}"))
    for path in unfinished:
        shutil.rmtree(path, ignore_errors=True)
    return unfinished


def write_error(workdir: Path, path: str, errno: int) -> WriteError:
    """The one line for a refused write: what, why, and the checkpoint the run resumes from."""
    # A checkpoint being saved: named by its folder, not by the file inside that failed.
    unfinished = re.match(rf"(.*{re.escape(os.sep)}(\d+))\.orbax-checkpoint-tmp", path)
    if unfinished:
        path = f"the checkpoint {unfinished.group(1)}"
    remove_unfinished(workdir)  # a save cut short leaves nothing half-written behind
    steps = complete_steps(workdir)
    resume = (
        f"the run can resume from its checkpoint at step {steps[-1]}"
        if steps
        else "no checkpoint was complete, so the run starts over"
    )
    return WriteError(
        f"{path}: cannot write ({os.strerror(errno)}); {resume}: make room and run the same command again"
    )


def _subfolders(path: Path) -> list[Path]:
    return [d for d in path.iterdir() if d.is_dir()] if path.is_dir() else []


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _path_names(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_difference(stored: Any, abstract: Any, *, partial: bool = False) -> str | None:
    """The first difference between a checkpoint's array metadata and the arrays expected.

    Args:
      stored: the checkpoint's tree of array metadata (``.shape``, ``.dtype``).
      abstract: the expected tree of ``jax.ShapeDtypeStruct``.
      partial: arrays in ``stored`` that ``abstract`` does not name are fine.

    Returns:
      A short description such as ``params/conv1/kernel: stored (3, 3, 1, 32), expected
      (3, 3, 1, 16)``, or None when the trees fit.
    """

    # Empty containers (a field that holds nothing, such as the EMA when it is off) count as
    # entries too: a checkpoint without the field has another structure and cannot restore.
    def entries(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, dict) and not x)[
            0
        ]
        return {_path_names(p): leaf for p, leaf in leaves}

    have, want = entries(stored), entries(abstract)
    for name, leaf in want.items():
        if name not in have:
            return f"{name}: not in the checkpoint"
        if isinstance(leaf, dict) or isinstance(have[name], dict):
            if isinstance(leaf, dict) != isinstance(have[name], dict):
                return f"{name}: stored {'nothing' if isinstance(have[name], dict) else 'an array'} there"
            continue
        if tuple(have[name].shape) != tuple(leaf.shape):
            return f"{name}: stored {tuple(have[name].shape)}, expected {tuple(leaf.shape)}"
        if jax.numpy.dtype(have[name].dtype) != jax.numpy.dtype(leaf.dtype):
            return f"{name}: stored {have[name].dtype}, expected {leaf.dtype}"
    extra = sorted(set(have) - set(want))
    if extra and not partial:
        return f"{extra[0]}: in the checkpoint but not in the model" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        )
    return None
