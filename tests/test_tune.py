"""`jax-mnist tune`: real Optuna searches of tiny trials on the bundled MNIST, in subprocesses.

The searches train an MLP of one 32-unit layer on 512 images for 2 epochs; what costs time is
compiling each trial's training step.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, run_cli, tiny_config

from jax_mnist.config import Config, resolve_config
from jax_mnist.data import load_dataset
from jax_mnist.data.datasets import SPLIT_FILES, bundled_dir, split_validation
from jax_mnist.errors import DataError, UserError
from jax_mnist.evaluate import evaluate_runs
from jax_mnist.train import train_and_evaluate

optuna = pytest.importorskip("optuna", reason="the tune tests need Optuna: pip install 'jax-mnist[tune]'")

from jax_mnist.tune import default_space, make_settings, open_study, toml_text  # noqa: E402

TINY = [
    *("--model", "mlp", "--width", "32", "--depth", "1"),
    *("--train-size", "512", "--val-size", "256", "--epochs", "2", "--batch-size", "64"),
    *("--eval-batch-size", "256", "--log-every", "100", "--no-tensorboard"),
]
SMALL = {"model": "mlp", "width": 32, "depth": 1, "progress": "plain", "tensorboard": False}
SPACE = """
lr = { type = "float", low = 1e-4, high = 1e-2, log = true }
dropout = { type = "float", low = 0.0, high = 0.5 }
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_study(study_dir: Path, name: str | None = None):
    storage = f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name=name or study_dir.name, storage=storage)


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def data_dir_with_garbage_test_files(root: Path) -> Path:
    """A copy of MNIST whose training files are real and whose test files are garbage."""
    root.mkdir()
    for key, stem in SPLIT_FILES.items():
        if key.startswith("train"):
            shutil.copy(bundled_dir() / f"{stem}.gz", root / f"{stem}.gz")
        else:
            (root / f"{stem}.gz").write_bytes(b"not the test set")
    return root


# -- the search space (no training)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('lr2 = { type = "float", low = 0.1, high = 0.2 }', "lr2: unknown setting"),
        ('lr = { type = "float", low = 0.01, high = 0.001 }', "lr: low (0.01) must be less than high"),
        (
            'weight_decay = { type = "float", low = 0.0, high = 0.1, log = true }',
            "weight_decay: a log-uniform range needs low > 0",
        ),
        ('dropout = { type = "float", low = 0.0, high = 0.99 }', "dropout: 0.99 is out of range"),
        (
            'width = { type = "float", low = 8, high = 32 }',
            'width: width is a whole number; use type = "int"',
        ),
        ('optimizer = { choices = ["adam", "nadam"] }', "optimizer: 'nadam' is out of range"),
        ('seed = { type = "int", low = 0, high = 9 }', "seed: not searchable"),
        ('val_size = { type = "int", low = 100, high = 900 }', "val_size: not searchable"),
        ('lr = { type = "float", low = 1e-4 }', "lr: high must be a finite number"),
        ('lr = { kind = "float" }', "lr: unknown key 'kind'"),
        ('epochs = { type = "int", low = 1, high = 5 }', "epochs: also fixed by --epochs"),
    ],
)
def test_bad_space_entries_get_one_line_naming_file_and_entry(tmp_path, entry, message):
    space = write(tmp_path / "space.toml", entry + "\n")
    with pytest.raises(UserError) as e:
        make_settings(tmp_path / "study", 3, {"epochs": 2}, space_file=space)
    assert str(e.value).startswith(f"{space}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_space_file_from_the_command_line_is_one_line(tmp_path):
    space = write(tmp_path / "space.yaml", "dropout: {type: float, low: 0.0, high: 2.0}\n")
    result = run_cli("tune", "--study", str(tmp_path / "s"), "--trials", "2", "--space", str(space))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"jax-mnist: error: {space}: dropout: 2.0 is out of range: --dropout: must be at most 0.95, got 2.0"
    ]
    assert not (tmp_path / "s").exists()


def test_yaml_space_reads_like_toml_and_default_space_leaves_out_fixed_flags(tmp_path):
    toml = write(
        tmp_path / "space.toml",
        SPACE + 'width = { choices = [16, 32] }\nepochs = { type = "int", low = 2, high = 6, step = 2 }\n',
    )
    yaml = write(
        tmp_path / "space.yaml",
        "lr: {type: float, low: 1e-4, high: 1.0e-2, log: true}\ndropout: {type: float, low: 0, high: 0.5}\n"
        "width: {choices: [16, 32]}\nepochs: {type: int, low: 2, high: 6, step: 2}\n",
    )
    a = make_settings(tmp_path / "s", 3, {}, space_file=toml).space
    b = make_settings(tmp_path / "s", 3, {}, space_file=yaml).space
    assert a == b
    assert [p.name for p in a] == ["lr", "dropout", "width", "epochs"]
    assert a[0].log and a[2].choices == (16, 32) and a[3].step == 2
    fixed = make_settings(tmp_path / "s", 3, {"model": "vgg", "epochs": 3, "lr": 0.01}).space
    names = {p.name for p in fixed}
    assert names == set(default_space("vgg")) - {"epochs", "lr"}
    assert {"width", "depth", "dropout", "weight_decay", "label_smoothing", "aug_shift"} <= names


def _proposals(settings, n: int) -> list[dict]:
    """The first ``n`` points a fresh study proposes, each told a score that depends on it."""
    study = open_study(settings)
    points = []
    for _ in range(n):
        trial = study.ask()
        params = {p.name: p.suggest(trial) for p in settings.space}
        study.tell(trial, -abs(np.log10(params["lr"]) + 2.5) - params["dropout"])
        points.append(params)
    return points


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask and tell here, not optimize
def test_a_seeded_search_proposes_the_same_trials_again(tmp_path):
    space = write(tmp_path / "space.toml", SPACE)
    runs = [
        _proposals(make_settings(tmp_path / name, 14, {}, space_file=space, sampler_seed=seed), 14)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    assert runs[0] == runs[1]  # TPE past its 10 random start-up trials included
    assert runs[0] != runs[2]


def test_without_optuna_one_line_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['optuna'] = None\n"  # import optuna raises ImportError
        "from jax_mnist.cli import main\n"
        f"sys.exit(main(['tune', '--study', {str(tmp_path / 's')!r}, '--trials', '1', '--epochs', '1']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "jax-mnist: error: jax-mnist tune needs Optuna: pip install 'jax-mnist[tune]'"
    )


def _storage_error(kind, message):
    import sqlalchemy.exc

    return getattr(sqlalchemy.exc, kind)("INSERT INTO studies ...", {}, sqlite3.OperationalError(message))


def test_storage_races_are_tried_again_and_lasting_failures_are_one_line(monkeypatch):
    from jax_mnist.tune import storage

    pauses = []
    monkeypatch.setattr(storage.time, "sleep", pauses.append)

    def failing(*errors):
        left = list(errors)

        def action():
            if left:
                raise left.pop(0)
            return "opened"

        return action

    # Another writer holds SQLite's lock, or created the tables first; Optuna may wrap the error.
    locked = _storage_error("OperationalError", "database is locked")
    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = _storage_error("OperationalError", "table studies already exists")
    duplicate = _storage_error("IntegrityError", "UNIQUE constraint failed: studies.study_name")
    action = failing(locked, wrapped, duplicate, optuna.exceptions.DuplicatedStudyError("taken"))
    assert storage.retry_transient(action, "--storage: cannot open x") == "opened"
    assert pauses == [0.5, 1.5, 2.5, 3.5]

    # A failure that lasts is said at once, in one line; so is one that only reads like a race.
    for error in (
        _storage_error("OperationalError", "unable to open database file"),
        RuntimeError("the database is locked\nmore"),
    ):
        pauses.clear()
        with pytest.raises(UserError) as caught:
            storage.retry_transient(failing(error), "--storage: cannot open x")
        assert str(caught.value).startswith("--storage: cannot open x: ") and "\n" not in str(caught.value)
        assert pauses == []

    # A race that never ends gives up after the last attempt.
    pauses.clear()
    with pytest.raises(UserError, match="database is locked"):
        storage.retry_transient(failing(*[locked] * 3), "--storage: cannot open x", attempts=3)
    assert pauses == [0.5, 1.5]


def test_best_toml_reads_back_as_the_same_config(tmp_path):
    config = Config.from_dict(
        {"preset": "best", "lr": 0.00123, "weight_decay": 1e-5, "width": 24, "nesterov": True}
    )
    path = write(tmp_path / "best.toml", toml_text(config, "header\nline two"))
    assert resolve_config({}, path) == config


def test_loading_without_the_test_set_never_opens_its_files(tmp_path):
    data = data_dir_with_garbage_test_files(tmp_path / "data")
    config = Config(data_dir=str(data))
    arrays = load_dataset(config, test=False)
    assert arrays.train_images.shape == (60000, 28, 28) and arrays.test_images is None
    with pytest.raises(DataError):
        load_dataset(config)
    (data / "t10k-images-idx3-ubyte.gz").unlink()  # and missing test files are no problem either
    assert load_dataset(config, test=False).train_labels.shape == (60000,)


# -- --val-seed


def test_val_seed_holds_out_the_same_images_for_runs_of_different_seeds(tmp_path):
    assert Config(seed=3).validation_seed == 3 and Config(seed=3, val_seed=0).validation_seed == 0
    runs = []
    for seed in (0, 1):
        config = tiny_config(epochs=1, seed=seed, val_seed=7, **SMALL)
        train_and_evaluate(config, tmp_path / f"seed{seed}", evaluate_test=False)
        runs.append(tmp_path / f"seed{seed}")
    result = evaluate_runs(runs, split="val", warn=lambda m: None)
    arrays = load_dataset(Config())
    _, _, _, val_labels = split_validation(arrays.train_images, arrays.train_labels, 512, 7)
    assert result["ensemble"] is not None
    assert sum(sum(row) for row in result["ensemble"]["confusion"]) == 512
    # the confusion rows count the true labels: the held-out images are those of --val-seed 7
    assert [sum(row) for row in result["ensemble"]["confusion"]] == np.bincount(
        val_labels, minlength=10
    ).tolist()
    # the same validation accuracy as each run measured in training on its held-out images
    for run, member in zip(runs, result["members"], strict=True):
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert member["accuracy"] == pytest.approx(
            [r for r in epochs if r["kind"] == "epoch"][-1]["val_accuracy"]
        )
    # runs of different seeds without a --val-seed held out different images: refused
    train_and_evaluate(tiny_config(epochs=1, seed=2, **SMALL), tmp_path / "seed2", evaluate_test=False)
    with pytest.raises(UserError, match="--val-seed"):
        evaluate_runs([runs[0], tmp_path / "seed2"], split="val", warn=lambda m: None)


# -- real searches


@pytest.mark.slow
def test_search_with_two_workers_prunes_writes_best_toml_and_never_reads_the_test_set(tmp_path):
    """20 trials, 2 worker processes on one SQLite file, a space with hopeless learning rates,
    and a data folder whose test files are garbage: ordinary training there fails."""
    data = data_dir_with_garbage_test_files(tmp_path / "data")
    space = write(tmp_path / "space.toml", 'lr = { type = "float", low = 1e-7, high = 1e-2, log = true }\n')
    study_dir = tmp_path / "study"
    t0 = time.perf_counter()
    result = run_cli(
        *("tune", "--study", str(study_dir), "--trials", "20", "--workers", "2", "--space", str(space)),
        *("--pruner", "median", "--data-dir", str(data), *TINY),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"20 trials, 2 workers: {time.perf_counter() - t0:.1f} s")

    study = load_study(study_dir)
    counts = states(study)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) >= 20
    assert counts.get("PRUNED", 0) >= 1, counts  # the hopeless learning rates were stopped early
    assert counts.get("FAIL", 0) == 0, counts
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers ran trials
    with contextlib.closing(sqlite3.connect(study_dir / "study.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    # a pruned trial stopped with the epoch it was pruned at: its run directory says so too
    for t in pruned:
        run = study_dir / f"trial-{t.number:04d}"
        epochs = [
            line for line in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in line
        ]
        assert len(epochs) == len(t.intermediate_values)
    assert all(len(t.intermediate_values) == 1 for t in pruned)  # stopped after epoch 1 of 2
    print("trial states:", counts)

    # every trial is an ordinary run directory, without a test evaluation
    for t in study.trials:
        run = study_dir / f"trial-{t.number:04d}"
        assert Path(t.user_attrs["workdir"]) == run.resolve()
        assert json.loads((run / "config.json").read_text())["lr"] == t.params["lr"]
        assert (run / "checkpoints").is_dir()
        assert not (run / "test_predictions.npz").exists()
        assert '"kind": "test"' not in (run / "metrics.jsonl").read_text()

    # the ranked table, best.toml and the report
    best = study.best_trial
    assert re.search(rf"^\s+1\s+{best.number}\s+complete\s+{100 * best.value:.2f}%", result.stdout, re.M)
    best_toml = (study_dir / "best.toml").read_text()
    assert f"lr = {best.params['lr']!r}" in best_toml
    page = (study_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<script" not in page  # stands alone
    for name in ("history.png", "importances.png", "top_curves.png"):
        assert (study_dir / name).stat().st_size > 5000

    # the same flags in ordinary training read the test set, and fail on its garbage
    failed = run_cli("train", "--workdir", str(tmp_path / "plain"), "--data-dir", str(data), *TINY)
    assert failed.returncode == 1 and "t10k-images-idx3-ubyte.gz" in failed.stderr

    # best.toml trains (here against the real test set), and the test accuracy comes when asked
    trained = run_cli(
        "train",
        "--config",
        str(study_dir / "best.toml"),
        "--workdir",
        str(tmp_path / "best"),
        "--data-dir",
        str(bundled_dir()),
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((tmp_path / "best" / "config.json").read_text())["lr"] == best.params["lr"]
    evaluated = run_cli(
        "evaluate", str(study_dir / f"trial-{best.number:04d}"), "--data-dir", str(bundled_dir())
    )
    assert evaluated.returncode == 0 and "test accuracy" in evaluated.stdout
    listed = run_cli("runs", str(study_dir))
    assert listed.returncode == 0 and f"trial-{best.number:04d}" in listed.stdout


@pytest.mark.slow
def test_ctrl_c_loses_only_the_trial_in_flight_and_the_rerun_completes_the_study(tmp_path):
    study_dir, space = tmp_path / "study", write(tmp_path / "space.toml", SPACE)
    args = [sys.executable, "-m", "jax_mnist", "tune", "--study", str(study_dir), "--trials", "3"]
    args += ["--space", str(space), "--pruner", "none", *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("trial 1: ") and "->" in line:  # trial 0 is complete, trial 1 started
                time.sleep(1.0)
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + out + err
    assert "trial 1 is marked failed" in err or "interrupted" in err, err
    study = load_study(study_dir)
    first = {t.number: (t.state.name, t.value) for t in study.trials}
    assert first[0][0] == "COMPLETE" and first[1][0] == "FAIL", first

    rerun = run_cli(
        "tune", "--study", str(study_dir), "--trials", "3", "--space", str(space), "--pruner", "none", *TINY
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of 3 trials done" in rerun.stdout
    study = load_study(study_dir)
    after = {t.number: (t.state.name, t.value) for t in study.trials}
    assert after[0] == first[0]  # the completed trial was kept, not run again
    assert after[1][0] == "FAIL"
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}

    # other settings are refused for the same study
    other = run_cli(
        "tune", "--study", str(study_dir), "--trials", "3", "--space", str(space), *TINY, "--epochs", "3"
    )
    assert other.returncode == 1 and "was started with other settings: epochs" in other.stderr


@pytest.mark.slow
@pytest.mark.long  # a worker killed mid-trial, then a command to finish the study: 50 s
def test_a_killed_worker_loses_only_its_trial_which_the_next_command_marks_failed(tmp_path):
    """SIGKILL leaves the trial RUNNING; once its heartbeat is stale (40 s), the rerun marks it
    failed and runs another in its place."""
    study_dir, space = tmp_path / "study", write(tmp_path / "space.toml", SPACE)
    command = [
        "tune",
        "--study",
        str(study_dir),
        "--trials",
        "2",
        "--space",
        str(space),
        "--pruner",
        "none",
        *TINY,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "jax_mnist", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            for line in proc.stdout:
                if line.startswith("trial 1: ") and "->" in line:
                    # At once: with its programs in the compilation cache, a tiny trial can end
                    # within a second of starting.
                    proc.kill()
                    break
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert {t.number: t.state.name for t in load_study(study_dir).trials} == {0: "COMPLETE", 1: "RUNNING"}
    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {t.number: t.state.name for t in load_study(study_dir).trials} == {
        0: "COMPLETE",
        1: "FAIL",
        2: "COMPLETE",
    }


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture
def postgres():
    """A PostgreSQL server of our own on 127.0.0.1, in a temporary folder; yields its URL."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install psycopg2-binary")
    # postgres refuses to run as root: as root, run it as the postgres user
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="jax-mnist-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    subprocess.run(
        [*as_user, bindir / "initdb", "-D", data, "-U", "tune", "-A", "trust"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    subprocess.run(
        [
            *as_user,
            bindir / "pg_ctl",
            "-D",
            data,
            "-o",
            options,
            "-l",
            root / "log",
            "-w",
            "-t",
            "60",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql+psycopg2://tune@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_commands_share_one_study_on_a_postgresql_server(tmp_path, postgres):
    space = write(tmp_path / "space.toml", SPACE)
    common = ["--trials", "4", "--space", str(space), "--storage", postgres, "--study-name", "shared", *TINY]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jax_mnist", "tune", "--study", str(tmp_path / f"machine{i}"), *common],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres)
    counts = states(study)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) >= 4 and counts.get("FAIL", 0) == 0
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both commands ran trials
    # each command's trials lie in its own study folder, named by the shared trial numbers
    numbers = sorted(
        int(p.name.split("-")[1]) for i in range(2) for p in (tmp_path / f"machine{i}").glob("trial-*")
    )
    assert numbers == sorted(t.number for t in study.trials)
    assert (
        "postgresql+psycopg2://tune:***@" in outputs[0][0] or "postgresql+psycopg2://tune@" in outputs[0][0]
    )
