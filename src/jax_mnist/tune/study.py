"""The study of ``jax-mnist tune``: its settings, its Optuna storage, the objective, the workers.

Each trial turns Optuna's suggestions into a :class:`Config` and trains it in-process with
:func:`train_and_evaluate` into an ordinary run directory ``STUDY/trial-NNNN``. In-process
rather than a ``jax-mnist train`` subprocess per trial: the per-epoch callback reports the
validation accuracy to Optuna and raises ``TrialPruned`` right there (a subprocess would need a
channel back for both), a trial costs no second start of Python and JAX, and Ctrl-C reaches
the training loop, which saves its checkpoint and stops, and Optuna marks the trial failed.
Several workers on one machine are separate processes (``python -m jax_mnist.tune``) sharing
the study's storage: each gets its own share of the CPU cores and of the GPU memory.

The objective is the best validation accuracy of the run; with a cost target
(``--cost-target 0.991``) a second objective, to minimize, is the training cost to first reach
that validation accuracy: images trained on times the model's forward FLOPs per image (XLA's
count), a figure that does not depend on the machine or its load. The test set is never loaded
during a search (``train_and_evaluate(..., evaluate_test=False)`` does not open its files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jax_mnist.config import LOCAL_FIELDS, Config, fields_with_role, normalize_keys, resolve_config
from jax_mnist.errors import ConfigError, UserError
from jax_mnist.tune.space import Param, build_space, format_params, parse_space
from jax_mnist.tune.storage import import_optuna, open_storage, redact, retry_transient

T = TypeVar("T")

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
WORKER_ENV = "JAX_MNIST_TUNE_WORKER"
# Settings that may differ between the commands of one study: those of the machine each runs
# on (paths, devices) and those that only say when a run logs and saves.
PER_COMMAND_FIELDS = fields_with_role("schedule") | LOCAL_FIELDS


class TuneInterrupted(UserError):
    """The search stopped on SIGINT/SIGTERM; the trial in flight is marked failed."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """What ``jax-mnist tune`` was asked. ``base`` is the config every trial starts from."""

    study_dir: Path
    trials: int
    base: Config
    space: tuple[Param, ...]
    workers: int = 1
    storage: str | None = None
    study_name: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    sampler_seed: int = 0
    # With a target validation accuracy, a second objective: training GFLOPs to first reach it.
    cost_target: float | None = None

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.study_dir / 'study.db').resolve()}"

    @property
    def name(self) -> str:
        return self.study_name or self.study_dir.resolve().name


def make_settings(
    study_dir: str | Path,
    trials: int,
    flags: dict[str, Any],
    *,
    config_file: Path | None = None,
    space_file: Path | None = None,
    workers: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    sampler_seed: int = 0,
    cost_target: float | None = None,
) -> TuneSettings:
    """Checks what the user gave and builds the settings of a search.

    Args:
      flags: flags of ``jax-mnist train`` given to tune (only those given): they fix these
        settings in every trial and take them out of the default space.
    """
    if trials < 1:
        raise ConfigError("--trials", f"must be at least 1, got {trials}")
    if workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {workers}")
    if sampler not in SAMPLERS:
        raise ConfigError("--sampler", f"must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if pruner not in PRUNERS:
        raise ConfigError("--pruner", f"must be one of {', '.join(PRUNERS)}; got {pruner!r}")
    if cost_target is not None and not 0 < cost_target < 1:
        raise ConfigError(
            "--cost-target", f"must be a validation accuracy between 0 and 1, got {cost_target}"
        )
    study_dir = Path(study_dir)
    if study_dir.exists() and not study_dir.is_dir():
        raise UserError(f"--study: {study_dir} is a file, not a directory")
    base = resolve_config(flags, config_file).validate()
    if base.val_size == 0:
        raise ConfigError("--val-size", "a search is scored on the validation split; it cannot be 0")
    fixed = set(normalize_keys(flags, source="command line"))
    if config_file is not None:
        from jax_mnist.config import load_config_file

        fixed |= set(load_config_file(config_file))
    space = build_space(space_file, base, fixed)
    return TuneSettings(
        study_dir,
        trials,
        base,
        tuple(space),
        workers,
        storage,
        study_name,
        sampler,
        pruner,
        sampler_seed,
        cost_target,
    )


def _study_attrs(settings: TuneSettings) -> dict[str, Any]:
    base = {k: v for k, v in settings.base.to_dict().items() if k not in PER_COMMAND_FIELDS}
    attrs: dict[str, Any] = {"base_config": base, "space": {p.name: p.to_dict() for p in settings.space}}
    if settings.cost_target is not None:
        attrs["cost_target"] = settings.cost_target
    return attrs


def open_study(settings: TuneSettings, *, seed_offset: int = 0):
    """Creates the study or loads it to continue; refuses one started with other settings."""
    optuna = import_optuna()
    settings.study_dir.mkdir(parents=True, exist_ok=True)  # the default storage lies in it
    storage = open_storage(settings.storage_url)
    study = retry_transient(
        lambda: optuna.create_study(
            storage=storage,
            study_name=settings.name,
            # Accuracy up; with a cost target, the training cost to reach it down too.
            directions=["maximize", "minimize"] if settings.cost_target is not None else ["maximize"],
            load_if_exists=True,
        ),
        f"--storage: cannot create study {settings.name!r}",  # two commands creating one study at once
    )
    attrs, stored = _study_attrs(settings), study.user_attrs
    if "base_config" not in stored:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
    else:
        differ = [
            f"{k} (study {stored['base_config'].get(k)!r}, given {v!r})"
            for k, v in attrs["base_config"].items()
            if stored["base_config"].get(k) != v
        ]
        if stored["space"] != attrs["space"]:
            differ.append("the search space")
        if stored.get("cost_target") != attrs.get("cost_target"):
            differ.append(
                f"--cost-target (study {stored.get('cost_target')}, given {attrs.get('cost_target')})"
            )
        if differ:
            raise UserError(
                f"study {settings.name!r} in {redact(settings.storage_url)} was started with other settings: "
                f"{'; '.join(differ)}. Give the same flags to continue it, or another --study-name"
            )
    # A new seed per worker and per restart: the same seed again would propose the same trials.
    import numpy as np

    done = len(study.get_trials(deepcopy=False))
    seed = int(np.random.SeedSequence([settings.sampler_seed, seed_offset, done]).generate_state(1)[0])
    if settings.sampler == "tpe":
        # constant_liar: trials running in other workers count as bad, so workers spread out.
        study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    else:
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
    if settings.cost_target is not None:
        # Optuna prunes single-objective studies only; a costed trial runs to its end.
        study.pruner = optuna.pruners.NopPruner()
        return study
    study.pruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }[settings.pruner]()
    return study


def counts(study) -> tuple[int, int]:
    """``(finished, running)`` trials: complete or pruned, and running."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return finished, sum(s == TrialState.RUNNING for s in states)


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / f"trial-{number:04d}"


def make_objective(settings: TuneSettings, log: Callable[[str], None]):
    """The objective: train one trial's config and return its best validation accuracy, and
    with a cost target also its training GFLOPs to first reach the target (see
    :func:`training_cost`)."""
    optuna = import_optuna()
    from jax_mnist.train import train_and_evaluate

    target = settings.cost_target

    def objective(trial) -> float | tuple[float, float]:
        params = {p.name: p.suggest(trial) for p in settings.space}
        config = settings.base.replace(**params).validate()
        workdir = trial_dir(settings.study_dir, trial.number)
        trial.set_user_attr("workdir", str(workdir.resolve()))
        trial.set_user_attr("host", os.uname().nodename)
        trial.set_user_attr("pid", os.getpid())
        log(f"trial {trial.number}: {format_params(params)} -> {workdir}")
        curve: list[tuple[int, float]] = []  # (images trained on, validation accuracy)

        def on_epoch(record: dict[str, Any]) -> None:
            curve.append((record["step"] * config.batch_size, record["val_accuracy"]))
            if target is not None:
                return  # Optuna takes no intermediate values from a multi-objective study
            trial.report(record["val_accuracy"], record["epoch"])
            # After the last epoch there is nothing left to save: the trial completes.
            if record["epoch"] < config.epochs and trial.should_prune():
                log(
                    f"trial {trial.number}: pruned after epoch {record['epoch']} "
                    f"(val acc {100 * record['val_accuracy']:.2f}%)"
                )
                raise optuna.TrialPruned()

        final = train_and_evaluate(config, workdir, evaluate_test=False, on_epoch=on_epoch)
        value = final["best_val_accuracy"]
        if target is None:
            log(f"trial {trial.number}: best val acc {100 * value:.2f}%")
            return value
        cost, reached = training_cost(config, curve, target)
        trial.set_user_attr("curve", curve)
        trial.set_user_attr("reached", reached)
        # Feasible at 0 or below: TPE ranks trials that fell short of the target after those that
        # reached it, so the search is not drawn to runs too short to get there.
        trial.set_constraint("short_of_target", target - value)
        how = "to reach" if reached else "without reaching"
        log(
            f"trial {trial.number}: best val acc {100 * value:.2f}%, {cost:,.0f} GFLOP {how} {100 * target:.2f}%"
        )
        return value, cost

    return objective


def training_cost(config: Config, curve: list[tuple[int, float]], target: float) -> tuple[float, bool]:
    """Training GFLOPs until the validation accuracy first reached ``target``, and whether it did.

    The cost is the images trained on (``curve`` holds ``(images, validation accuracy)`` at
    each evaluation) times the model's forward FLOPs per image as XLA counts them: a property of
    the recipe, not of the machine or its load. A run that never reached the target costs what
    it trained in all.
    """
    from flax import nnx

    from jax_mnist.data.datasets import DATASETS
    from jax_mnist.models import flops_per_image, model_from_config

    model = nnx.eval_shape(model_from_config(config, DATASETS[config.dataset].num_classes))
    reached_at = next((n for n, accuracy in curve if accuracy >= target), None)
    images = curve[-1][0] if reached_at is None else reached_at
    return images * flops_per_image(model) / 1e9, reached_at is not None


def run_worker(settings: TuneSettings, *, worker: int = 0, log: Callable[[str], None] = print) -> None:
    """Runs trials in this process until the study has ``settings.trials`` finished ones.

    Trials running in other workers count as on their way; when they are all that is missing,
    this waits for them and takes over if one fails (or goes stale: its worker died).
    """
    optuna = import_optuna()
    from jax_mnist.train import TrainingInterrupted

    study = open_study(settings, seed_offset=worker)
    objective = make_objective(settings, log)
    while True:
        optuna.storages.fail_stale_trials(study)
        finished, running = counts(study)
        if finished >= settings.trials:
            return
        if finished + running >= settings.trials:
            time.sleep(2)
            continue
        try:
            study.optimize(objective, n_trials=1, gc_after_trial=True)
        except (TrainingInterrupted, KeyboardInterrupt) as e:
            # Optuna has marked the trial failed; its run directory keeps its last checkpoint.
            code = getattr(e, "exit_code", 130)
            number = max(t.number for t in study.get_trials(deepcopy=False))
            raise TuneInterrupted(
                f"{signal.Signals(code - 128).name}: stopped; trial {number} is marked failed. "
                "Run the same command again to continue the study",
                code,
            ) from None


def _worker_spec(settings: TuneSettings, worker: int) -> str:
    return json.dumps(
        {
            "study_dir": str(settings.study_dir.resolve()),
            "trials": settings.trials,
            "base": settings.base.to_dict(),
            "space": {p.name: p.to_dict() for p in settings.space},
            "storage": settings.storage_url,
            "study_name": settings.name,
            "sampler": settings.sampler,
            "pruner": settings.pruner,
            "sampler_seed": settings.sampler_seed,
            "cost_target": settings.cost_target,
            "worker": worker,
            "workers": settings.workers,
        }
    )


def run_worker_processes(settings: TuneSettings) -> None:
    """Starts ``settings.workers`` worker processes and waits for them; Ctrl-C stops them all."""
    env = dict(os.environ)
    # On a GPU the workers share its memory: each may take its part (JAX takes 75% by default).
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / settings.workers:.3f}")
    procs = []
    try:
        for worker in range(settings.workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "jax_mnist.tune"],
                    env={**env, WORKER_ENV: _worker_spec(settings, worker)},
                )
            )
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise TuneInterrupted(
            "interrupted: the trials in flight are marked failed. Run the same command again to continue the study"
        ) from None
    failed = [c for c in codes if c != 0]
    if failed:
        raise UserError(
            f"{len(failed)} of {settings.workers} workers failed (exit codes {failed}); see their output above"
        )


def _cpu_share(worker: int, workers: int) -> set[int]:
    """The CPU cores worker ``worker`` of ``workers`` keeps: an equal share (at least one)."""
    cpus = sorted(os.sched_getaffinity(0))
    if workers >= len(cpus):
        return {cpus[worker % len(cpus)]}
    share = len(cpus) // workers
    return set(cpus[worker * share : (worker + 1) * share])


def worker_main() -> int:
    """Entry point of a worker process started by :func:`_run_worker_processes`."""
    spec = json.loads(os.environ.pop(WORKER_ENV))
    # Before JAX starts: XLA sizes its thread pools from the cores this process may use.
    if hasattr(os, "sched_setaffinity") and spec["workers"] > 1:
        os.sched_setaffinity(0, _cpu_share(spec["worker"], spec["workers"]))
    base = Config.from_dict(spec["base"], source=WORKER_ENV)
    settings = TuneSettings(
        Path(spec["study_dir"]),
        spec["trials"],
        base,
        tuple(parse_space(spec["space"], base, source=WORKER_ENV)),
        1,
        spec["storage"],
        spec["study_name"],
        spec["sampler"],
        spec["pruner"],
        spec["sampler_seed"],
        spec["cost_target"],
    )
    prefix = f"[worker {spec['worker']}] "
    try:
        run_worker(settings, worker=spec["worker"], log=lambda line: print(prefix + line, flush=True))
    except UserError as e:
        print(f"jax-mnist: error: {prefix}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0
