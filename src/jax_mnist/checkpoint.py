"""Checkpoints with Orbax: the latest few and the best by validation accuracy.

Layout of a run directory::

    config.json              the resolved config of the run
    metrics.jsonl            one JSON record per log point, epoch and test evaluation
    checkpoints/latest/<step>/{state,meta,config}   the last --keep checkpoints
    checkpoints/best/<step>/{state,meta,config}     the one with the best validation accuracy

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a save
cut short is never taken for a checkpoint. A checkpoint that is damaged after the fact
(a file truncated or deleted) fails to restore; :meth:`Checkpoints.restore` then says so and
falls back to the next older one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_mnist.config import Config
from jax_mnist.errors import UserError

KINDS = ("latest", "best")


def _manager(directory: Path, keep: int, *, best: bool, read_only: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda metrics: metrics["val_accuracy"]) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        # Saves are small and rare; writing synchronously means a save is on disk before
        # the next step, and before the process exits on Ctrl-C.
        enable_async_checkpointing=False,
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
    """

    def __init__(self, workdir: Path, keep: int = 3, *, read_only: bool = False):
        self.root = Path(workdir) / "checkpoints"
        if read_only and not self.root.is_dir():
            raise UserError(
                f"{workdir}: no checkpoints here; train with `jax-mnist train --workdir {workdir}` first"
            )
        self.latest = _manager(self.root / "latest", keep, best=False, read_only=read_only)
        self.best = _manager(self.root / "best", 1, best=True, read_only=read_only)

    def save(
        self, state: Any, meta: dict[str, Any], config: Config, *, val_accuracy: float | None = None
    ) -> None:
        """Saves ``state`` as the latest checkpoint, and as the best when it is.

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
        if step not in self.latest.all_steps():
            self.latest.save(step, args=args, force=True)
        if val_accuracy is not None and step not in self.best.all_steps():
            self.best.save(step, args=args, metrics={"val_accuracy": val_accuracy}, force=True)
        self.latest.wait_until_finished()
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
            path = Path(manager.directory) / str(step) / "config" / "metadata"
            try:
                return Config.from_dict(json.loads(path.read_text()), source=str(path))
            except (OSError, ValueError):
                continue
        raise UserError(f"{self.root}: no readable checkpoint; train again or pass another run directory")

    def restore(
        self, abstract_state: Any, which: str | int = "latest", *, warn=print
    ) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest intact checkpoint of ``which`` (``latest``, ``best`` or a step).

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with shardings) to restore into.
          warn: called with a one-line message for each damaged checkpoint skipped.

        Returns:
          ``(state, meta)``, or None when there is no checkpoint at all.

        Raises:
          UserError: every checkpoint there is damaged.
        """
        manager, steps = self._candidates(which)
        if not steps:
            return None
        for step in steps:
            try:
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                jax.block_until_ready(restored.state)
                return restored.state, dict(restored.meta)
            except Exception as e:
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                warn(
                    f"warning: checkpoint {Path(manager.directory) / str(step)} is damaged "
                    f"({reason}); trying an older one"
                )
        raise UserError(f"{manager.directory}: every checkpoint is damaged; delete the folder to start over")

    def close(self) -> None:
        self.latest.close()
        self.best.close()
