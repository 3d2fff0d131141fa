"""The training loop's plan: which steps run in one device call, and what follows each call.

A pure function of the step counts and cadences, with no JAX in it, so every combination of
cadences can be checked quickly (see ``tests/test_plan.py``). The loop in ``train.py`` runs
the chunks this yields and does what each one says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Steps ``start`` to ``start + num_steps - 1`` (global), run without the host looking.

    Attributes:
      start: the global step the chunk starts at.
      num_steps: how many steps it runs; a chunk never crosses a log point, a checkpoint
        step or the end of an epoch.
      epoch: the 0-based epoch it belongs to.
      position: the step of its epoch it starts at (0: it begins the epoch).
      epoch_steps: the steps of its epoch, fewer than an epoch's when the run ends part way
        through it (``--epochs 1.5``).
      log: after it, log the training loss of the steps since the last log point.
      epoch_end: it ends its epoch (or the run, part way through its last epoch): evaluate
        on the validation split.
      checkpoint: after it, save a checkpoint (by epoch or step cadence, or at the end).
    """

    start: int
    num_steps: int
    epoch: int
    position: int
    epoch_steps: int
    log: bool
    epoch_end: bool
    checkpoint: bool

    @property
    def end(self) -> int:
        """The global step after the chunk."""
        return self.start + self.num_steps


def plan_chunks(
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    *,
    log_every: int,
    checkpoint_every: int = 1,
    checkpoint_every_steps: int = 0,
) -> Iterator[Chunk]:
    """The chunks from ``start_step`` to ``total_steps``.

    Log points fall every ``log_every`` steps counted from the start of each epoch, and at
    each epoch's end (the run's last step ends its epoch, a whole one or not); checkpoints every ``checkpoint_every`` epochs, every
    ``checkpoint_every_steps`` global steps (0: never), and after the last step.
    """
    step = start_step
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        # The last epoch is shorter when the run ends part way through one (--epochs 1.5).
        epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        end = min(epoch_steps, (position // log_every + 1) * log_every)
        if checkpoint_every_steps:
            next_save = (step // checkpoint_every_steps + 1) * checkpoint_every_steps
            end = min(end, next_save - epoch * steps_per_epoch)
        after = epoch * steps_per_epoch + end
        epoch_end = end == epoch_steps
        checkpoint = (
            after == total_steps
            or (epoch_end and (epoch + 1) % checkpoint_every == 0)
            or bool(checkpoint_every_steps and after % checkpoint_every_steps == 0)
        )
        yield Chunk(
            start=step,
            num_steps=end - position,
            epoch=epoch,
            position=position,
            epoch_steps=epoch_steps,
            log=end % log_every == 0 or epoch_end,
            epoch_end=epoch_end,
            checkpoint=checkpoint,
        )
        step = after
