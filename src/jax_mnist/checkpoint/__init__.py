"""Checkpoints with Orbax: the latest few and the best by validation accuracy.

Layout of a run directory::

    config.json              the resolved config of the run
    metrics.jsonl            one JSON record per log point, epoch and test evaluation
    checkpoints/latest/<step>/{state,meta,config}   the last --keep checkpoints
    checkpoints/best/<step>/{state,meta,config}     the one with the best validation accuracy

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a save
cut short is never taken for a checkpoint. Restoring tells two failures apart:

- a checkpoint that is *damaged* after the fact (a file truncated, altered, deleted or
  replaced) fails to read, or reads back arrays that differ from the checksums its meta
  stored at the save; :meth:`Checkpoints.restore` says so in one line and falls back to the
  next older one. When the run is open for writing (training), the damaged checkpoint is
  moved to ``checkpoints/damaged/`` (and the move is reported), so that training saves that
  step anew instead of finding it taken. Damage is told by the error's chain of causes
  (:mod:`jax_mnist.checkpoint.damage`), whatever Orbax wraps it in; any other error stays loud;
- a checkpoint that *does not fit* (its arrays have other names or shapes than the model the
  config describes: another model definition or package version) is intact, so nothing is
  moved and no older checkpoint is tried: the error names the first difference.

The modules: ``manager`` (:class:`Checkpoints`, the run directory's helpers), ``damage``
(what counts as damage), ``hooks`` (the filters that keep the reads Orbax abandons in a
damaged checkpoint from printing tracebacks).
"""

from jax_mnist.checkpoint.damage import ChecksumMismatch, damage
from jax_mnist.checkpoint.manager import (
    UNFINISHED,
    CheckpointMismatch,
    Checkpoints,
    array_checksums,
    check_arrays,
    complete_steps,
    remove_unfinished,
    tree_difference,
    write_error,
)

__all__ = [
    "UNFINISHED",
    "CheckpointMismatch",
    "Checkpoints",
    "ChecksumMismatch",
    "array_checksums",
    "check_arrays",
    "complete_steps",
    "damage",
    "remove_unfinished",
    "tree_difference",
    "write_error",
]
