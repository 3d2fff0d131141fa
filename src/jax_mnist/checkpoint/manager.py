"""The checkpoints of a run directory: saving, restoring, falling back past damage."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jax_mnist.checkpoint.damage import ChecksumMismatch, damage, describe
from jax_mnist.checkpoint.hooks import (
    keep_silencing_reads_left_in_flight,
    keeping_filters_on_failure,
    silence_reads_left_in_flight,
)
from jax_mnist.config import Config
from jax_mnist.errors import UserError, WriteError

# What Orbax calls a checkpoint it is still writing (``64.orbax-checkpoint-tmp``, in older
# versions with a timestamp after it): renamed to its step when complete.
UNFINISHED = "*.orbax-checkpoint-tmp*"

# Where a checkpoint's meta keeps the CRC-32 of each array saved (see array_checksums).
CHECKSUMS = "checksums"


class CheckpointMismatch(UserError):
    """An intact checkpoint whose arrays do not fit the model the config describes."""


def _manager(
    directory: Path, keep: int, *, best: bool, read_only: bool, async_save: bool
) -> ocp.CheckpointManager:
    val_accuracy = (lambda metrics: metrics["val_accuracy"]) if best else None
    policy = (
        ocp.checkpoint_managers.BestN(
            get_metric_fn=val_accuracy, n=keep, keep_checkpoints_without_metrics=False
        )
        if best
        else ocp.checkpoint_managers.LatestN(n=keep)
    )
    options = ocp.CheckpointManagerOptions(
        # What is kept (Orbax's preservation policy; max_to_keep is deprecated), and how the
        # best is told (best_fn, read by best_step()).
        preservation_policy=policy,
        best_fn=val_accuracy,
        best_mode="max",
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

    Two Orbax managers, ``latest`` (``LatestN``) and ``best`` (``BestN`` by validation
    accuracy), so a save with a validation score is written twice (the second write runs in
    the background too: see ``benchmarks/checkpoint_costs.py``). One manager keeping both
    (``AnyPreservationPolicy`` of the two over one folder) would write it once, but Orbax reads
    every checkpoint's metrics when it opens a folder: one damaged metrics file would then
    stop the opening of the folder training resumes from, where now it costs only ``best``
    (moved aside); that folder would hold an older best beside the latest ``--keep``; and the
    run directories written so far keep a ``best`` folder to read as it is.

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
        # Notes for the first restore's warn: what was found damaged while opening.
        self._notes: list[str] = []
        self.best: ocp.CheckpointManager | None = self._open_best(async_save)

    def _open_best(self, async_save: bool) -> ocp.CheckpointManager | None:
        """The manager of ``best``; None (read-only) when its metrics files are damaged.

        Orbax reads every checkpoint's metrics when it opens the folder, so a damaged one fails
        the opening itself. Open for writing, the folder is moved to ``checkpoints/damaged/``
        and started anew (the latest checkpoints are untouched).
        """
        directory = self.root / "best"
        try:
            return _manager(directory, 1, best=True, read_only=self.read_only, async_save=async_save)
        except Exception as e:
            found = damage(e)
            if found is None:
                raise
            note = f"warning: checkpoint {directory} is damaged ({describe(found)})"
        if self.read_only:
            self._notes.append(f"{note}; trying the latest ones")
            return None
        target = self._damaged_name("best")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(directory, target)
        self._notes.append(f"{note}; moved it to {target}")
        return _manager(directory, 1, best=True, read_only=False, async_save=async_save)

    def _damaged_name(self, name: str) -> Path:
        target = self.root / "damaged" / name
        n = 1
        while target.exists():
            n += 1
            target = self.root / "damaged" / f"{name}.{n}"
        return target

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
        meta = {**meta, CHECKSUMS: array_checksums(state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(config.to_dict()),
        )
        with keeping_filters_on_failure():
            if step not in self.latest.all_steps():
                self.latest.save(step, args=args, force=True)
            if val_accuracy is not None and self.best is not None and step not in self.best.all_steps():
                self.best.save(step, args=args, metrics={"val_accuracy": val_accuracy}, force=True)

    def wait(self) -> None:
        """Waits until every checkpoint saved so far is complete on disk."""
        with keeping_filters_on_failure():
            try:
                self.latest.wait_until_finished()
            finally:
                if self.best is not None:
                    self.best.wait_until_finished()

    def steps(self, kind: str = "latest") -> list[int]:
        manager = self.best if kind == "best" else self.latest
        return sorted(manager.all_steps()) if manager is not None else []

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self.latest, self.best) if m is not None]

    def _candidates(self, which: str | int) -> list[tuple[ocp.CheckpointManager, int]]:
        """The checkpoints ``which`` names, in the order to try them (the next when one is damaged)."""
        if isinstance(which, int) or str(which).isdigit():
            step = int(which)
            for manager in self._managers():
                if step in manager.all_steps():
                    return [(manager, step)]
            raise UserError(
                f"{self.root}: no checkpoint at step {step}; there are "
                f"{sorted({s for m in self._managers() for s in m.all_steps()})}"
            )
        latest = [(self.latest, step) for step in sorted(self.latest.all_steps(), reverse=True)]
        if which == "best":
            best = self.best.best_step() if self.best is not None else None
            # Then the latest ones: with the best damaged, the newest intact weights are next.
            # Without a validation split there is no best: the latest is the best we have.
            return ([(self.best, best)] if best is not None else []) + latest
        return latest

    def read_config(self, which: str | int = "latest") -> Config:
        """The config stored with a checkpoint (the first readable one, newest first)."""
        for manager, step in self._candidates(which):
            # The config item alone, through Orbax (about 15 ms a checkpoint on a CPU, where
            # reading its file directly took 0.3 ms: nothing beside loading a model).
            try:
                stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            except Exception as e:
                # No config item (KeyError) or a damaged one: the next checkpoint's will do.
                if not isinstance(e, KeyError) and damage(e) is None:
                    raise
                continue
            return Config.from_dict(dict(stored), source=str(Path(manager.directory) / str(step) / "config"))
        raise UserError(f"{self.root}: no readable checkpoint; train again or pass another run directory")

    def restore(
        self, abstract_state: Any, which: str | int = "latest", *, partial: bool = False, warn=print
    ) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest intact checkpoint of ``which`` (``latest``, ``best`` or a step).

        A damaged checkpoint is reported through ``warn`` and the next one is tried: an older
        one, or after a damaged ``best``, the latest ones, newest first.

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
        for note in self._notes:
            warn(note)
        self._notes.clear()
        candidates = self._candidates(which)
        if not candidates:
            return None
        # Before the first read: a damaged file can fail a read while others are in flight.
        self._filter_stray_reads()
        for manager, step in candidates:
            kind = "best" if manager is self.best else "latest"
            state_dir = Path(manager.directory) / str(step) / "state"
            read = self._read(manager, step, abstract_state, partial=partial)
            if not isinstance(read, str):
                return read
            problem = read
            # Orbax gave up on this checkpoint with reads still in flight, which end (or are
            # collected) at any later time, up to the process's exit.
            keep_silencing_reads_left_in_flight()
            warn(f"warning: checkpoint {state_dir.parent} is damaged ({problem}); trying the next one")
            if not self.read_only:
                self._quarantine(manager, kind, step, warn)
        advice = (
            "the damaged ones were moved to " + str(self.root / "damaged")
            if not self.read_only
            else "`jax-mnist train --workdir` on this run moves them aside"
        )
        raise UserError(f"{self.root}: every checkpoint is damaged ({advice})")

    def _read(
        self, manager: ocp.CheckpointManager, step: int, abstract_state: Any, *, partial: bool
    ) -> tuple[Any, dict[str, Any]] | str:
        """``(state, meta)`` of one checkpoint, or what is damaged in it (one line).

        Raises:
          CheckpointMismatch: the checkpoint is intact but holds other arrays.
        """
        state_dir = Path(manager.directory) / str(step) / "state"
        # The handler rather than a Checkpointer, whose metadata() turns the errors of a
        # damaged checkpoint into no metadata, without saying which.
        handler = ocp.PyTreeCheckpointHandler()
        try:
            stored = handler.metadata(state_dir).tree
        except Exception as e:
            return f"its array metadata cannot be read: {describe(_damage_or_raise(e))}"
        finally:
            handler.close()
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
            meta = dict(restored.meta)
            check_arrays(restored.state, meta.pop(CHECKSUMS, None))
        except Exception as e:
            return describe(_damage_or_raise(e))
        return restored.state, meta

    def _quarantine(self, manager: ocp.CheckpointManager, kind: str, step: int, warn) -> None:
        """Moves a damaged checkpoint out of the manager's sight, so its step can be saved anew."""
        source = Path(manager.directory) / str(step)
        target = self._damaged_name(f"{kind}-{step}")
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
                    if self.best is not None:
                        self.best.close()
                finally:
                    self._filtering = False
                    self._filters.close()


def _damage_or_raise(error: Exception) -> BaseException:
    """The link of ``error``'s chain that says a checkpoint is damaged; ``error`` itself,
    raised again from where it was caught, when it is not damage."""
    found = damage(error)
    if found is None:
        raise error
    return found


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


def _path_names(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(_path_names(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _host_copy(leaf: Any) -> np.ndarray | None:
    """A leaf's whole value on the host, or None where this process holds only a part of it."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.sharding.is_fully_replicated:
            return None
        leaf = leaf.addressable_data(0)
    return np.asarray(leaf)


def array_checksums(tree: Any) -> dict[str, str]:
    """The CRC-32 of each array of ``tree``, by its path (``params/conv1/kernel``).

    Stored in a checkpoint's meta when it is saved, and checked by :func:`check_arrays` when it
    is restored: a byte altered inside a data file that TensorStore reads without complaint
    (an uncompressed chunk has no checksum of its own) would otherwise restore as other numbers.
    An array this process holds only a part of (sharded over several processes) is left out.

    Args:
      tree: a pytree of arrays of any shapes and dtypes.

    Returns:
      ``{path: "crc32 as 8 hex digits, of the shape, the dtype and the bytes"}``.
    """
    sums = {}
    for name, leaf in _leaves(tree):
        value = _host_copy(leaf)
        if value is not None:
            value = np.ascontiguousarray(value)
            head = f"{value.shape}{value.dtype.str}".encode()
            sums[name] = f"{zlib.crc32(value.reshape(-1).view(np.uint8).data, zlib.crc32(head)):08x}"
    return sums


def check_arrays(tree: Any, checksums: dict[str, str] | None) -> None:
    """Checks restored arrays against the checksums stored with them (none: nothing to check).

    Raises:
      ChecksumMismatch: an array differs from what was saved.
    """
    if not checksums:
        return  # saved before checkpoints carried checksums
    found = array_checksums(tree)
    for name, crc in found.items():
        if name in checksums and checksums[name] != crc:
            raise ChecksumMismatch(f"{name}: the bytes read differ from the checksum stored at its save")


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
