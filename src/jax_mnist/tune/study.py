"""``jax-mnist tune``: a hyperparameter search on the validation split with Optuna.

Each trial turns Optuna's suggestions into a :class:`Config` and trains it in-process with
:func:`train_and_evaluate` into an ordinary run directory ``STUDY/trial-NNNN``. In-process
rather than a ``jax-mnist train`` subprocess per trial: the per-epoch callback reports the
validation accuracy to Optuna and raises ``TrialPruned`` right there (a subprocess would need a
channel back for both), a trial costs no second start of Python and JAX, and Ctrl-C reaches
the training loop, which saves its checkpoint and stops, and Optuna marks the trial failed.
Several workers on one machine are separate processes (``python -m jax_mnist.tune``) sharing
the study's storage: each gets its own share of the CPU cores and of the GPU memory.

The objective is the best validation accuracy of the run. The test set is never loaded during
a search (``train_and_evaluate(..., evaluate_test=False)`` does not open its files); a
trial's test accuracy is computed only when asked, with ``jax-mnist evaluate STUDY/trial-NNNN``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jax_mnist.config import (
    FIELDS,
    SCHEDULE_ONLY_FIELDS,
    Config,
    field_type,
    flag_name,
    normalize_keys,
    read_table_file,
    resolve_config,
)
from jax_mnist.errors import ConfigError, UserError

INSTALL_HINT = "pip install 'jax-mnist[tune]'"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")
WORKER_ENV = "JAX_MNIST_TUNE_WORKER"
# A worker's liveness signal: a trial whose worker stopped beating for GRACE_PERIOD_S (killed,
# machine lost) is marked failed by the next worker that looks.
HEARTBEAT_S = 10
GRACE_PERIOD_S = 40

# Settings a search must not vary: they change which images validate (so trials would be
# scored on different sets), what is trained on, or only where and how output goes.
NOT_SEARCHABLE = (
    frozenset(
        {"preset", "dataset", "data_dir", "data_source", "val_size", "val_seed", "seed", "eval_batch_size"}
    )
    | SCHEDULE_ONLY_FIELDS
)
# Settings that may differ between the commands of one study (paths on different machines).
LOCAL_FIELDS = SCHEDULE_ONLY_FIELDS | {"data_dir"}


class TuneInterrupted(UserError):
    """The search stopped on SIGINT/SIGTERM; the trial in flight is marked failed."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def import_optuna():
    """Optuna, quiet at INFO; a one-line error naming the extra when it is not installed."""
    try:
        import optuna
    except ImportError:
        raise UserError(f"jax-mnist tune needs Optuna: {INSTALL_HINT}") from None
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats and fail_stale_trials are marked experimental; we rely on them knowingly.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# -- the search space


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched setting: a :class:`Config` field and its distribution.

    ``kind`` is ``float`` or ``int`` (between ``low`` and ``high``, log-uniform with ``log``,
    on a grid of ``step``) or ``categorical`` (one of ``choices``).
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        value = trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {list(self.choices)}"
        extra = ", log" if self.log else (f", step {self.step}" if self.step is not None else "")
        return f"{self.name} {self.kind} [{self.low}, {self.high}{extra}]"


def _common_space() -> dict[str, dict[str, Any]]:
    return {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.6},
        "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
        "aug_shift": {"type": "float", "low": 0.0, "high": 3.0},
        "aug_rotate": {"type": "float", "low": 0.0, "high": 15.0},
        "aug_scale": {"type": "float", "low": 0.0, "high": 0.15},
        "epochs": {"type": "int", "low": 4, "high": 16},
    }


# Width (and depth where the model has one) per model family, around each model's default.
_FAMILY_SPACE: dict[str, dict[str, dict[str, Any]]] = {
    "cnn": {"width": {"choices": [16, 24, 32, 48]}},
    "lenet5": {"width": {"choices": [6, 12, 18, 24]}},
    "mlp": {"width": {"choices": [256, 512, 1024]}, "depth": {"type": "int", "low": 1, "high": 3}},
    "vgg": {"width": {"choices": [16, 32, 48]}, "depth": {"type": "int", "low": 1, "high": 3}},
    "resnet": {"width": {"choices": [8, 16, 32]}, "depth": {"type": "int", "low": 1, "high": 3}},
}


def default_space(model: str) -> dict[str, dict[str, Any]]:
    """The built-in space of a model family, as the entries of a space file."""
    return {**_common_space(), **_FAMILY_SPACE.get(model, {})}


def read_space_file(path: Path) -> dict[str, Any]:
    """The raw entries of a TOML or YAML space file."""
    return read_table_file(path, kind="space file", json_ok=False)


def parse_space(entries: dict[str, Any], base: Config, *, source: str) -> list[Param]:
    """Checks the entries of a space (field name -> distribution) against ``base`` and the
    ranges of :class:`Config`; a one-line :class:`UserError` names ``source`` and the entry."""
    params = []
    for key, spec in entries.items():
        name = str(key).replace("-", "_")
        where = f"{source}: {key}"
        if name not in FIELDS:
            raise UserError(f"{where}: unknown setting; the entries are fields of `jax-mnist train --help`")
        if name in NOT_SEARCHABLE:
            raise UserError(
                f"{where}: not searchable (it changes the validation images or only the output); "
                f"fix it with {flag_name(name)} instead"
            )
        if not isinstance(spec, dict):
            raise UserError(f'{where}: must be a table such as {{type = "float", low = 0.0, high = 1.0}}')
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise UserError(
                f"{where}: unknown key {sorted(unknown)[0]!r}; use type, low, high, log, step or choices"
            )
        params.append(_parse_entry(name, spec, base, where))
    return params


def _check_value(base: Config, name: str, value: Any, where: str) -> Any:
    """``value`` as the field's type, checked by :meth:`Config.validate`."""
    try:
        value = normalize_keys({name: value}, source=where)[name]
        base.replace(**{name: value}).validate()
    except ConfigError as e:
        raise UserError(f"{where}: {value!r} is out of range: {e}") from None
    except UserError as e:
        raise UserError(str(e)) from None
    return value


def _parse_entry(name: str, spec: dict[str, Any], base: Config, where: str) -> Param:
    kind = field_type(name)
    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise UserError(f"{where}: choices cannot be combined with type, low, high, log or step")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list")
        return Param(name, "categorical", choices=tuple(_check_value(base, name, c, where) for c in choices))
    dist = spec.get("type")
    if dist not in ("float", "int"):
        raise UserError(f'{where}: needs type = "float" or "int" with low and high, or a list of choices')
    if kind not in (float, int):
        raise UserError(f"{where}: a {kind.__name__} setting is searched with choices, not a {dist} range")
    if kind is int and dist == "float":
        raise UserError(f'{where}: {name} is a whole number; use type = "int"')
    bounds = {}
    for bound in ("low", "high"):
        value = spec.get(bound)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"{where}: {bound} must be a finite number, got {value!r}")
        if dist == "int" and value != int(value):
            raise UserError(f'{where}: {bound} must be a whole number for type = "int", got {value!r}')
        bounds[bound] = int(value) if dist == "int" else float(value)
        _check_value(base, name, kind(bounds[bound]), where)
    low, high = bounds["low"], bounds["high"]
    if not low < high:
        raise UserError(f"{where}: low ({low}) must be less than high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise UserError(f"{where}: a log-uniform range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or not step > 0:
            raise UserError(f"{where}: step must be a positive number, got {step!r}")
        if log:
            raise UserError(f"{where}: step and log cannot be combined")
        step = int(step) if dist == "int" else float(step)
    return Param(name, dist, low, high, log, step)


def build_space(space_file: Path | None, base: Config, fixed: set[str]) -> list[Param]:
    """The searched settings: a space file's, or the model family's default space less the
    settings fixed by flags. A space file entry that a flag also fixes is an error."""
    if space_file is not None:
        params = parse_space(read_space_file(space_file), base, source=str(space_file))
        for p in params:
            if p.name in fixed:
                raise UserError(
                    f"{space_file}: {p.name}: also fixed by {flag_name(p.name)}; drop the flag or the entry"
                )
    else:
        entries = {k: v for k, v in default_space(base.model).items() if k not in fixed}
        params = parse_space(entries, base, source=f"default space of {base.model}")
    if not params:
        raise UserError("nothing to search: every setting of the space is fixed by a flag")
    return params


# -- the study


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
        study_dir, trials, base, tuple(space), workers, storage, study_name, sampler, pruner, sampler_seed
    )


def open_storage(url: str):
    """Optuna's RDB storage at ``url`` with heartbeats, retried while another process creates it."""
    optuna = import_optuna()
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Writers queue for SQLite's lock instead of failing at once; workers write briefly.
        engine_kwargs = {"connect_args": {"timeout": 120}}
    for attempt in range(10):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_PERIOD_S,
            )
        except ModuleNotFoundError as e:
            raise UserError(
                f"--storage: the database driver {e.name!r} is not installed "
                "(for PostgreSQL: pip install psycopg2-binary)"
            ) from None
        except Exception as e:  # sqlalchemy's errors: a race creating the tables, or no server
            if attempt == 9 or not _is_transient(e):
                raise UserError(f"--storage: cannot open {_redact(url)}: {e}".splitlines()[0]) from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def _is_transient(e: Exception) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("already exists", "locked", "duplicate", "unique constraint"))


def _redact(url: str) -> str:
    """``url`` without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        if ":" in credentials:
            return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


def _study_attrs(settings: TuneSettings) -> dict[str, Any]:
    base = {k: v for k, v in settings.base.to_dict().items() if k not in LOCAL_FIELDS}
    return {"base_config": base, "space": {p.name: p.to_dict() for p in settings.space}}


def open_study(settings: TuneSettings, *, seed_offset: int = 0):
    """Creates the study or loads it to continue; refuses one started with other settings."""
    optuna = import_optuna()
    settings.study_dir.mkdir(parents=True, exist_ok=True)  # the default storage lies in it
    storage = open_storage(settings.storage_url)
    study = None
    for attempt in range(10):
        try:
            study = optuna.create_study(
                storage=storage, study_name=settings.name, direction="maximize", load_if_exists=True
            )
            break
        except Exception as e:  # two commands creating one study at once
            if attempt == 9 or not _is_transient(e):
                raise UserError(
                    f"--storage: cannot create study {settings.name!r}: {e}".splitlines()[0]
                ) from None
            time.sleep(0.5 + attempt)
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
        if differ:
            raise UserError(
                f"study {settings.name!r} in {_redact(settings.storage_url)} was started with other settings: "
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
    study.pruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }[settings.pruner]()
    return study


def _counts(study) -> tuple[int, int]:
    """``(finished, running)`` trials: complete or pruned, and running."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return finished, sum(s == TrialState.RUNNING for s in states)


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / f"trial-{number:04d}"


def make_objective(settings: TuneSettings, log: Callable[[str], None]):
    """The objective: train one trial's config, return its best validation accuracy."""
    optuna = import_optuna()
    from jax_mnist.train import train_and_evaluate

    def objective(trial) -> float:
        params = {p.name: p.suggest(trial) for p in settings.space}
        config = settings.base.replace(**params).validate()
        workdir = trial_dir(settings.study_dir, trial.number)
        trial.set_user_attr("workdir", str(workdir.resolve()))
        trial.set_user_attr("host", os.uname().nodename)
        trial.set_user_attr("pid", os.getpid())
        log(f"trial {trial.number}: {_format_params(params)} -> {workdir}")

        def on_epoch(record: dict[str, Any]) -> None:
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
        log(f"trial {trial.number}: best val acc {100 * value:.2f}%")
        return value

    return objective


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
        finished, running = _counts(study)
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


def tune(settings: TuneSettings, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the search (in this process, or in ``settings.workers`` worker processes), then
    writes the summary: the ranked table, ``best.toml`` and ``report.html`` in the study folder.

    Returns:
      ``{"trials": rows of :func:`trial_rows`, "best": the best row or None, "files": [...]}``.
    """
    settings.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings)  # creates the study (and the tables) once, before any worker
    finished, _ = _counts(study)
    log(
        f"study {settings.name!r}: {finished} of {settings.trials} trials done; "
        f"storage {_redact(settings.storage_url)}; searching {', '.join(p.describe() for p in settings.space)}"
    )
    t0 = time.perf_counter()
    if settings.workers == 1:
        run_worker(settings, log=log)
    else:
        _run_worker_processes(settings)
    log(f"search took {time.perf_counter() - t0:.1f} s")
    return summarize(settings, log=log)


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
            "worker": worker,
            "workers": settings.workers,
        }
    )


def _run_worker_processes(settings: TuneSettings) -> None:
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


# -- the summary: ranked table, best.toml, report.html


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial, best validation accuracy first (pruned trials by their last report)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        reported = t.intermediate_values
        value = t.value if t.value is not None else (max(reported.values()) if reported else None)
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "val_accuracy": value,
                "epochs": len(reported),
                "params": dict(t.params),
                "workdir": t.user_attrs.get("workdir"),
                "curve": [reported[k] for k in sorted(reported)],
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else None,
            }
        )
    order = {"complete": 0, "pruned": 1}
    rows.sort(key=lambda r: (order.get(r["state"], 2), -(r["val_accuracy"] or 0.0), r["number"]))
    return rows


def format_table(rows: list[dict[str, Any]], space: tuple[Param, ...]) -> str:
    names = [p.name for p in space]
    header = ["rank", "trial", "state", "val acc", "epochs", *names]
    lines = [header]
    for rank, r in enumerate(rows, 1):
        acc = "-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%"
        lines.append(
            [
                str(rank),
                str(r["number"]),
                r["state"],
                acc,
                str(r["epochs"]),
                *(_short(r["params"].get(n)) for n in names),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def toml_text(config: Config, header: str = "") -> str:
    """``config`` as a TOML file that ``jax-mnist train --config`` reads back to the same config.

    Unset (None) settings are left out: the preset's None is what they read back as.
    """
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in config.to_dict().items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value)  # a JSON string is a TOML basic string
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def summarize(settings: TuneSettings, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prints the ranked table and writes ``best.toml`` and ``report.html`` (with its PNGs)."""
    study = open_study(settings)
    rows = trial_rows(study)
    log(format_table(rows, settings.space))
    complete = [r for r in rows if r["state"] == "complete"]
    files = []
    best = complete[0] if complete else None
    if best is not None:
        config = settings.base.replace(**best["params"]).validate()
        header = (
            f"Best trial of study {settings.name!r}: trial {best['number']}, "
            f"validation accuracy {100 * best['val_accuracy']:.2f}% ({best['workdir']}).\n"
            f"Train it with: jax-mnist train --config {settings.study_dir / 'best.toml'}"
        )
        path = settings.study_dir / "best.toml"
        path.write_text(toml_text(config, header))
        files.append(path)
        log(
            f"best: trial {best['number']}, val acc {100 * best['val_accuracy']:.2f}%: {_format_params(best['params'])}"
        )
    files += write_study_report(settings, study, rows)
    for path in files:
        log(str(path))
    return {"trials": rows, "best": best, "files": [str(p) for p in files]}


HISTORY, IMPORTANCES, TOP_CURVES, PAGE = "history.png", "importances.png", "top_curves.png", "report.html"
TOP = 5  # trials whose validation curves are drawn


def _label_accuracy_axes(ax, xlabel: str) -> None:
    """Validation accuracy (%) against whole numbers of ``xlabel`` (trials or epochs)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_history(rows: list[dict[str, Any]]):
    """Validation accuracy of each trial in order, and the best so far."""
    from jax_mnist.report import _figure

    fig = _figure(7, 4)
    ax = fig.add_subplot()
    by_number = sorted((r for r in rows if r["val_accuracy"] is not None), key=lambda r: r["number"])
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "C3")):
        points = [(r["number"], 100 * r["val_accuracy"]) for r in by_number if r["state"] == state]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, color=color, label=state)
    best, steps = -math.inf, []
    for r in by_number:
        if r["state"] == "complete":
            best = max(best, 100 * r["val_accuracy"])
        if best > -math.inf:
            steps.append((r["number"], best))
    if steps:
        ax.step(*zip(*steps, strict=True), where="post", color="C1", label="best so far")
    _label_accuracy_axes(ax, "trial")
    return fig


def plot_importances(importances: dict[str, float]):
    from jax_mnist.report import _figure

    names = list(importances)[::-1]
    fig = _figure(7, 0.4 * len(names) + 1.2)
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set_xlabel("importance for validation accuracy (PED-ANOVA, sums to 1)")
    return fig


def plot_top_curves(rows: list[dict[str, Any]]):
    """Validation accuracy per epoch of the best trials (as reported to Optuna)."""
    from jax_mnist.report import _figure

    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for r in rows[:TOP]:
        ax.plot(
            range(1, len(r["curve"]) + 1),
            [100 * v for v in r["curve"]],
            marker="o",
            label=f"trial {r['number']}",
        )
    _label_accuracy_axes(ax, "epoch")
    return fig


def write_study_report(settings: TuneSettings, study, rows: list[dict[str, Any]]) -> list[Path]:
    """The figures and the self-contained ``report.html`` of the study."""
    from jax_mnist.report import _figure_html, _page, save_figure, write_text

    out = settings.study_dir
    figures: list[tuple[Path, str]] = []
    if any(r["val_accuracy"] is not None for r in rows):
        figures.append(
            (
                save_figure(plot_history(rows), out / HISTORY),
                "Validation accuracy of each trial and the best so far.",
            )
        )
    importances = {}
    if sum(r["state"] == "complete" for r in rows) >= 2:
        with contextlib.suppress(Exception):  # too few or too alike trials to assess
            importances = import_optuna().importance.get_param_importances(study)
    if importances:
        figures.append(
            (save_figure(plot_importances(importances), out / IMPORTANCES), "Parameter importances.")
        )
    ranked = [r for r in rows if r["curve"] and r["state"] in ("complete", "pruned")]
    if ranked:
        figures.append(
            (
                save_figure(plot_top_curves(ranked), out / TOP_CURVES),
                f"Validation accuracy per epoch of the {min(TOP, len(ranked))} best trials.",
            )
        )
    names = [p.name for p in settings.space]
    head = "".join(
        f"<th>{html.escape(h)}</th>" for h in ["rank", "trial", "state", "val acc", "epochs", *names]
    )
    body = ""
    for rank, r in enumerate(rows, 1):
        acc = "-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%"
        link = html.escape(Path(r["workdir"]).name) if r["workdir"] else ""
        trial = f'<a href="{link}/">{r["number"]}</a>' if link else str(r["number"])
        cells = [
            str(rank),
            trial,
            r["state"],
            acc,
            str(r["epochs"]),
            *(_short(r["params"].get(n)) for n in names),
        ]
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    space = "".join(f"<li>{html.escape(p.describe())}</li>" for p in settings.space)
    page_body = (
        f"<p>{len(rows)} trials, scored by validation accuracy "
        f"({settings.base.val_size} images); the test set was not read. "
        f"Storage: {html.escape(_redact(settings.storage_url))}.</p>"
        f"<h2>Search space</h2><ul>{space}</ul>"
        + "".join(_figure_html(path, caption=caption) for path, caption in figures)
        + f"<h2>Trials</h2><table><tr>{head}</tr>{body}</table>"
    )
    page = write_text(out / PAGE, _page(f"Study {settings.name}", page_body))
    return [path for path, _ in figures] + [page]


if __name__ == "__main__":
    sys.exit(worker_main())
