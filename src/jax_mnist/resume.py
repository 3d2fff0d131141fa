"""Whether a run in a directory starts, resumes or is refused, and with which config.

:func:`resolve_run` is the one place that decides: a run directory with a checkpoint resumes
with its stored config and the flags given on top, as long as they change nothing the run
computes (:func:`check_resume_config`); without one a new run starts from the preset and the
flags. ``jax-mnist train`` asks it before building anything, so a refusal is one line; for a
directory without checkpoints it reads no file but the config file and imports no JAX, so a
bad flag is refused before JAX starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax_mnist.config import RESULT_NEUTRAL_FIELDS, Config, resolve_config
from jax_mnist.errors import UserError


def check_resume_config(stored: Config, config: Config, workdir: Path) -> None:
    """Refuses to resume a run with settings that would change what it computes.

    Only :data:`~jax_mnist.config.RESULT_NEUTRAL_FIELDS` may change (the fields whose role is
    ``schedule`` or ``machine``), and ``epochs`` when the learning rate does not depend on the
    run's length (a constant schedule, with or without warmup): then a finished run can be
    extended. A schedule laid over the whole run (one-cycle, cosine, step) would give other
    rates to the steps already taken, so its ``epochs`` is fixed. ``epochs`` is a result
    field (a search varies it) whose change is decided here, from the stored schedule.
    """
    if config.epochs != stored.epochs and stored.schedule_spans_run:
        raise UserError(
            f"--epochs: {workdir} trained with a {stored.schedule} learning-rate schedule laid over "
            f"{stored.epochs:g} epochs; over {config.epochs:g} it would have given other rates to the "
            f"steps already taken. Resume with --epochs {stored.epochs:g}, or train a new run with "
            f"--epochs {config.epochs:g} in another --workdir"
        )
    differ = [
        f"{name} (stored {getattr(stored, name)!r}, given {getattr(config, name)!r})"
        for name in stored.to_dict()
        if name not in RESULT_NEUTRAL_FIELDS | {"epochs"} and getattr(stored, name) != getattr(config, name)
    ]
    if differ:
        raise UserError(
            f"{workdir} holds a run with other settings: {'; '.join(differ)}. "
            "Use another --workdir, or resume with the stored settings"
        )


def may_hold_checkpoints(workdir: str | Path) -> bool:
    """Whether ``workdir`` has anything in its checkpoints folder (False: a new run starts,
    and :func:`resolve_run` reads nothing of it)."""
    folder = Path(workdir) / "checkpoints"
    return folder.is_dir() and any(folder.iterdir())


def resolve_run(
    workdir: str | Path,
    given: Config | dict[str, Any],
    *,
    config_file: Path | None = None,
    resume: bool = False,
) -> Config:
    """The config to run in ``workdir``: where a run starts, resumes or is refused.

    Args:
      workdir: the run directory; a run resumes when it holds a checkpoint.
      given: a whole config (the Python API), or the flags given on the command line, which
        apply on top of the resumed run's stored config (or of their preset for a new run).
      config_file: a TOML/YAML/JSON file of settings under the flags.
      resume: require a checkpoint to resume from.

    Returns:
      The validated config.

    Raises:
      UserError: ``resume`` without a checkpoint, or settings that would change what the
        resumed run computes; one line says which and what to do.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir: {workdir} is a file, not a run directory")
    stored = None
    if may_hold_checkpoints(workdir):
        from jax_mnist.checkpoint import Checkpoints  # Orbax and JAX: only for a run to resume

        checkpoints = Checkpoints(workdir, read_only=True)
        try:
            stored = checkpoints.read_config() if checkpoints.steps() else None
        finally:
            checkpoints.close()
    if resume and stored is None:
        raise UserError(f"{workdir}: no checkpoint to resume from; drop --resume to start a new run")
    config = given if isinstance(given, Config) else resolve_config(given, config_file, stored)
    config.validate()
    if stored is not None:
        check_resume_config(stored, config, workdir)
    return config
